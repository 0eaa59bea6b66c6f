"""EfficientAD networks (patch description networks, autoencoder) and the PUAD teacher-distillation target.

See specs/puad_efficientad.md §1–§2. Layer names follow anomalib / PUAD (`conv1`…), so their
state dicts load directly; nelson1425's Sequential teacher files load through
`load_teacher_state_dict`, which remaps their layer-index keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from networks.anomaly_model import AnomalyModel, AnomalyOutput
from networks.backbones import (
    FeatureExtractor,
    ImageNetNormalize,
    Pretrained,
    fuse_features,
    load_weights_file,
    unwrap_state_dict,
)
from networks.statistics import exact_quantile

__all__ = [
    "EfficientADAutoencoder",
    "EfficientADModel",
    "PatchDescriptionNetwork",
    "WideResNetDistillationTarget",
    "load_teacher_state_dict",
    "sequential_keys_to_named",
]

# Index of each conv in nelson1425's nn.Sequential PDNs (ReLU and AvgPool take the other slots).
SEQUENTIAL_CONV_INDICES = {"small": (0, 3, 6, 8), "medium": (0, 3, 6, 8, 10, 12)}


class PatchDescriptionNetwork(nn.Module):
    """PDN-S / PDN-M (spec §1.1–§1.2): [0, 1] image → out_channels × 56² (unpadded, 256 px) or 64² (padded).

    Teacher: out_channels=384; student: 768 (first half imitates the teacher, second half the
    autoencoder). `padding=True` is only for distilling the teacher from a WideResNet; the
    weights fit either way. ImageNet normalisation happens inside.
    """

    def __init__(self, size: str = "small", out_channels: int = 384, padding: bool = False) -> None:
        super().__init__()
        if size not in SEQUENTIAL_CONV_INDICES:
            raise ValueError(f"PDN size must be 'small' or 'medium', got {size!r}.")
        self.size, self.out_channels, self.padding = size, out_channels, padding
        pad = 1 if padding else 0
        self.normalize = ImageNetNormalize()
        self.avgpool1 = nn.AvgPool2d(2, stride=2, padding=pad)
        self.avgpool2 = nn.AvgPool2d(2, stride=2, padding=pad)
        if size == "small":
            self.conv1 = nn.Conv2d(3, 128, 4, padding=3 * pad)
            self.conv2 = nn.Conv2d(128, 256, 4, padding=3 * pad)
            self.conv3 = nn.Conv2d(256, 256, 3, padding=pad)
            self.conv4 = nn.Conv2d(256, out_channels, 4)
        else:
            self.conv1 = nn.Conv2d(3, 256, 4, padding=3 * pad)
            self.conv2 = nn.Conv2d(256, 512, 4, padding=3 * pad)
            self.conv3 = nn.Conv2d(512, 512, 1)
            self.conv4 = nn.Conv2d(512, 512, 3, padding=pad)
            self.conv5 = nn.Conv2d(512, out_channels, 4)
            self.conv6 = nn.Conv2d(out_channels, out_channels, 1)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        x = self.avgpool1(F.relu(self.conv1(x)))
        x = self.avgpool2(F.relu(self.conv2(x)))
        if self.size == "small":
            return self.conv4(F.relu(self.conv3(x)))
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        return self.conv6(F.relu(self.conv5(x)))  # the ReLU before the last 1×1 conv is in all three repos


class _AutoencoderEncoder(nn.Module):
    """Five conv4×4 s2 (3→32→32→64→64→64) and a conv to 64×1×1; ReLU after all but the last."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.enconv1 = nn.Conv2d(3, 32, 4, stride=2, padding=1)
        self.enconv2 = nn.Conv2d(32, 32, 4, stride=2, padding=1)
        self.enconv3 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        self.enconv4 = nn.Conv2d(64, 64, 4, stride=2, padding=1)
        self.enconv5 = nn.Conv2d(64, 64, 4, stride=2, padding=1)
        self.enconv6 = nn.Conv2d(64, 64, image_size // 32)  # kernel 8 at 256 px

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.enconv1, self.enconv2, self.enconv3, self.enconv4, self.enconv5):
            x = F.relu(conv(x))
        return self.enconv6(x)


class _AutoencoderDecoder(nn.Module):
    """Six [bilinear resize → conv4×4 pad 2 → ReLU → dropout 0.2], resize to the PDN size, two conv3×3."""

    def __init__(self, out_channels: int, image_size: int, padding: bool) -> None:
        super().__init__()
        s = image_size
        # Resize targets before each conv4×4 (which adds one pixel): 3, 8, 15, 32, 63, 127 at 256 px.
        self.sizes = [s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1]
        self.last_size = s // 4 if padding else s // 4 - 8  # the PDN output size: 64 / 56 at 256 px
        for index in range(1, 7):
            self.add_module(f"deconv{index}", nn.Conv2d(64, 64, 4, stride=1, padding=2))
            self.add_module(f"dropout{index}", nn.Dropout(p=0.2))
        self.deconv7 = nn.Conv2d(64, 64, 3, stride=1, padding=1)
        self.deconv8 = nn.Conv2d(64, out_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, size in enumerate(self.sizes, start=1):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = getattr(self, f"dropout{index}")(F.relu(getattr(self, f"deconv{index}")(x)))
        x = F.interpolate(x, size=self.last_size, mode="bilinear", align_corners=False)
        return self.deconv8(F.relu(self.deconv7(x)))


class EfficientADAutoencoder(nn.Module):
    """EfficientAD's autoencoder (spec §1.3): [0, 1] image → out_channels × 56² at 256 px (64² with padding).

    Sizes follow the [P]/[A] formulas for image size S; the bottleneck kernel is S/32 (8 at
    256 px) so the encoder reaches 1×1 at other sizes too. Dropout is active in train mode only.
    """

    def __init__(self, out_channels: int = 384, image_size: int = 256, padding: bool = False) -> None:
        super().__init__()
        if image_size < 128 or image_size % 64:
            raise ValueError(f"image_size must be a multiple of 64 and at least 128, got {image_size}.")
        self.normalize = ImageNetNormalize()
        self.encoder = _AutoencoderEncoder(image_size)
        self.decoder = _AutoencoderDecoder(out_channels, image_size, padding)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        return self.decoder(self.encoder(x))


# --------------------------------------------------------------------------------------------
# Teacher weight files
# --------------------------------------------------------------------------------------------

_PARAMETER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<layer>\d+|conv\d+)\.(?P<param>weight|bias)$")
ACCEPTED_LAYOUTS = (
    "nelson1425 Sequential keys ('0.weight', '3.weight', ... : small 0,3,6,8; medium 0,3,6,8,10,12) or "
    "named keys ('conv1.weight', ... : small conv1-conv4; medium conv1-conv6), optionally under one "
    "prefix such as 'teacher.' or 'model.', optionally inside {'state_dict': ...}"
)


def sequential_keys_to_named(state_dict: Mapping[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Rename nelson1425 Sequential keys ('6.weight') to named keys ('conv3.weight') for a PDN of `size`."""
    names = {
        str(index): f"conv{position}" for position, index in enumerate(SEQUENTIAL_CONV_INDICES[size], start=1)
    }
    renamed = {}
    for key, value in state_dict.items():
        layer, _, param = key.partition(".")
        if layer not in names:
            raise ValueError(
                f"Key {key!r} is not a conv of nelson1425's PDN-{size} (conv indices {SEQUENTIAL_CONV_INDICES[size]})."
            )
        renamed[f"{names[layer]}.{param}"] = value
    return renamed


def _select_prefix(
    state_dict: dict[str, torch.Tensor], prefix: str | None, source: str
) -> dict[str, torch.Tensor]:
    """Keep the keys under one prefix (given, the only one present, or the one ending in 'teacher.') and strip it."""
    if prefix is None:
        prefixes = {match["prefix"] for key in state_dict if (match := _PARAMETER_KEY.match(key))}
        if not prefixes:
            raise ValueError(
                f"{source} has no PDN conv keys (found {sorted(state_dict)[:10]}). Accepted layouts: "
                + ACCEPTED_LAYOUTS
            )
        if len(prefixes) == 1:
            prefix = prefixes.pop()
        else:
            teacher_prefixes = [p for p in prefixes if p.endswith("teacher.")]
            if len(teacher_prefixes) != 1:
                raise ValueError(
                    f"{source} holds PDN-like weights under several prefixes {sorted(prefixes)}; "
                    "pass prefix=... to choose one. Accepted layouts: " + ACCEPTED_LAYOUTS
                )
            prefix = teacher_prefixes[0]
    selected = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not selected:
        raise ValueError(
            f"{source} has no keys under prefix {prefix!r}. Accepted layouts: " + ACCEPTED_LAYOUTS
        )
    return selected


def load_teacher_state_dict(
    module: PatchDescriptionNetwork,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    prefix: str | None = None,
) -> str:
    """Load teacher (or student) PDN weights in either key layout found in the wild; return the layout used.

    Raises ValueError naming unexpected/missing keys, a small/medium mix-up or a shape mismatch.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(Path(path_or_state_dict))
        state_dict = load_weights_file(path_or_state_dict, strip_prefixes=False)
    else:
        source = "the given state dict"
        state_dict = unwrap_state_dict(path_or_state_dict, source, strip_prefixes=False)
    state_dict = _select_prefix(state_dict, prefix, source)

    layers = {key.partition(".")[0] for key in state_dict}
    if layers and all(layer.isdigit() for layer in layers):
        layout = "nelson1425 sequential"
        indices = tuple(sorted(int(layer) for layer in layers))
        found_size = next(
            (size for size, expected in SEQUENTIAL_CONV_INDICES.items() if indices == expected), None
        )
        if found_size is None:
            raise ValueError(
                f"{source}: Sequential layer indices {list(indices)} match neither PDN-small "
                f"{SEQUENTIAL_CONV_INDICES['small']} nor PDN-medium {SEQUENTIAL_CONV_INDICES['medium']}. "
                "Accepted layouts: " + ACCEPTED_LAYOUTS
            )
        if found_size != module.size:
            raise ValueError(
                f"{source} holds PDN-{found_size} weights but the module is a PDN-{module.size}."
            )
        state_dict = sequential_keys_to_named(state_dict, found_size)
    else:
        layout = "named"
        convs = sorted(layer for layer in layers if re.fullmatch(r"conv\d+", layer))
        if len(convs) in (4, 6) and len(convs) == len(layers):
            found_size = "small" if len(convs) == 4 else "medium"
            if found_size != module.size:
                raise ValueError(
                    f"{source} holds PDN-{found_size} weights but the module is a PDN-{module.size}."
                )

    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit a PDN-{module.size}: missing keys {missing}, unexpected keys {unexpected}. "
            "Accepted layouts: " + ACCEPTED_LAYOUTS
        )
    mismatched = [
        f"{key}: module {tuple(expected[key].shape)} vs file {tuple(state_dict[key].shape)}"
        for key in expected
        if expected[key].shape != state_dict[key].shape
    ]
    if mismatched:
        raise ValueError(
            f"{source} has shapes that do not fit this PDN-{module.size} with {module.out_channels} output "
            f"channels: {mismatched}."
        )
    module.load_state_dict(state_dict, strict=True)
    return layout


class WideResNetDistillationTarget(nn.Module):
    """PUAD's teacher-distillation target (spec §2.1 [P]): a frozen WideResNet's layer2 and layer3 fused to 384 channels.

    layer3 is bilinearly upsampled to layer2's size, concatenated, and channel-average-pooled;
    no 3×3 neighbourhood aggregation (that is nelson1425's variant). A 512 px image gives
    384×64×64, the padded PDN's output size at 256 px.
    """

    def __init__(
        self,
        pretrained: Pretrained = True,
        weights_file: str | None = None,
        backbone: str = "wide_resnet101_2.tv_in1k",
        out_channels: int = 384,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.feature_extractor = FeatureExtractor(backbone, ["layer2", "layer3"], pretrained, weights_file)

    @property
    def weights_source(self) -> str:
        return self.feature_extractor.weights_source

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layer2, layer3 = self.feature_extractor(images)
        return fuse_features(layer2, layer3, self.out_channels)


# --------------------------------------------------------------------------------------------
# The whole detector
# --------------------------------------------------------------------------------------------

TEACHER_CHANNELS = 384


def normalize_map(anomaly_map: torch.Tensor, q_low: torch.Tensor, q_high: torch.Tensor) -> torch.Tensor:
    """0.1 · (M − q_low) / (q_high − q_low): q_low → 0, q_high → 0.1 (spec §5)."""
    return 0.1 * (anomaly_map - q_low) / (q_high - q_low)


class EfficientADModel(AnomalyModel):
    """EfficientAD-S/M's whole inference path: teacher, student, autoencoder, maps, normalisation, score.

    Fitted buffers: ``teacher_mean`` / ``teacher_std`` (teacher channel statistics over the training
    images, spec §2.3; std 0 = not fitted), ``map_quantiles`` ((q_low, q_high) of the student–teacher
    then the autoencoder map on held-out normal images, spec §5 [P]) and the decision threshold.
    Maps: no 4 px padding; each 56×56 map is bilinearly upsampled to the image size, then
    normalised. Image score: the maximum of the combined map.
    """

    def __init__(self, model_size: str = "small", image_size: int = 256) -> None:
        super().__init__(image_size)
        self.model_size = model_size
        self.teacher = PatchDescriptionNetwork(model_size, TEACHER_CHANNELS, padding=False)
        self.teacher.requires_grad_(False)
        self.student = PatchDescriptionNetwork(model_size, 2 * TEACHER_CHANNELS, padding=False)
        self.autoencoder = EfficientADAutoencoder(TEACHER_CHANNELS, image_size, padding=False)
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("map_quantiles", torch.zeros(4))
        self.teacher.eval()

    def train(self, mode: bool = True) -> EfficientADModel:
        """The teacher stays in eval mode: it is frozen."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def teacher_statistics_fitted(self) -> bool:
        return bool((self.teacher_std > 0).all())

    @property
    def map_quantiles_fitted(self) -> bool:
        return bool(self.map_quantiles.abs().sum() > 0)

    def statistics_fitted(self) -> bool:
        return self.teacher_statistics_fitted and self.map_quantiles_fitted

    def describe_input(self) -> dict:
        return {**super().describe_input(), "normalisation_inside": "ImageNet mean/std"}

    def check_size(self, images: torch.Tensor) -> None:
        expected = self.image_size
        if not torch.jit.is_tracing() and tuple(images.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"EfficientAD was built for {expected}×{expected} images (the autoencoder's output size "
                f"depends on it) but got {tuple(images.shape[-2:])}; set data.image_size (the model takes it from there)."
            )

    @torch.no_grad()
    def set_teacher_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.teacher_mean.copy_(mean.float().view_as(self.teacher_mean))
        self.teacher_std.copy_(std.float().clamp_min(torch.finfo(torch.float32).tiny).view_as(self.teacher_std))

    def normalized_teacher(self, images: torch.Tensor) -> torch.Tensor:
        """(T − μ)/σ in float32, no gradient."""
        with torch.no_grad():
            return (self.teacher(images).float() - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw student–teacher and autoencoder maps (B×1×S×S, upsampled, float32) plus the feature maps."""
        self.check_size(images)
        teacher = self.normalized_teacher(images)
        student = self.student(images).float()
        autoencoder = self.autoencoder(images).float()
        map_st = ((teacher - student[:, :TEACHER_CHANNELS]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((autoencoder - student[:, TEACHER_CHANNELS:]) ** 2).mean(dim=1, keepdim=True)
        maps = F.interpolate(torch.cat([map_st, map_ae], dim=1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        return {"map_st": maps[:, :1], "map_ae": maps[:, 1:], "teacher": teacher, "student": student}

    def combined_map(self, map_st: torch.Tensor, map_ae: torch.Tensor) -> torch.Tensor:
        """0.5 · normalised ST map + 0.5 · normalised AE map."""
        q = self.map_quantiles
        return 0.5 * normalize_map(map_st, q[0], q[1]) + 0.5 * normalize_map(map_ae, q[2], q[3])

    @torch.no_grad()
    def set_map_quantiles(self, map_st: torch.Tensor, map_ae: torch.Tensor, q_low: float, q_high: float) -> None:
        """Quantiles of the validation images' upsampled maps, pooled over all pixels (spec §5 [P])."""
        fitted = [exact_quantile(values, level) for values in (map_st, map_ae) for level in (q_low, q_high)]
        self.map_quantiles.copy_(torch.stack(fitted).to(self.map_quantiles.device))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        outputs = self.raw_maps(images)
        anomaly_map = self.combined_map(outputs["map_st"], outputs["map_ae"])
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(-3, -2, -1)))
