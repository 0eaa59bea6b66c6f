"""What the official-code recordings and their tests share: the settings, the inputs, the weights, fingerprints.

Weights are a function of each official parameter's name and shape (a generator seeded by the name's CRC32),
so the fixture needs no weight file: the test regenerates the same numbers and maps them to our names.
"""

from __future__ import annotations

import re
import zlib

import torch

# A small OneNIP: the official module fixes the hidden width at 256 (its final attention is hard-coded); fewer
# channels, layers and a narrower FFN keep the recording small. 96 px → a 6×6 token grid, neighbour window 3.
FIXTURE_SETTINGS = {"channels": 16, "grid": 6, "image_size": 96, "layers": 2, "ffn_dim": 64, "batch": 2}
# A small CRAD on the whole official pipeline (b4 backbone, neck, grids, fusion, refinement, scoring): the official
# bottleneck hard-codes 432 = 2 × 216 channels, so b4's two levels stay; 128 px → 16×16 features, two bottlenecks.
# The refinement gate opens at MSE ≤ 0.5 / gate_scale: 0.54 puts that at these weights' median per-pixel MSE
# (≈ 0.93), so the recording has pixels on both sides (the paper's 0.05 would open it everywhere here).
CRAD_FIXTURE_SETTINGS = {"image_size": 128, "batch": 2, "blocks": 2, "expansion": 864, "smoothing": 21, "pool": 32,
                         "gate_scale": 0.54}


def seeded_weights(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 weights for every entry of a state dict: U(−1/√fan_in, 1/√fan_in) for matrices and kernels,
    U(−0.1, 0.1) for biases, 1 + U(−0.1, 0.1) for norm scales, U(0, 1) for positional tables, U(−1, 1) for CRAD's
    grids (official names ``query.0/1``: read at full scale, not at a fan-in's), positive BN variances; the BN batch
    counter is copied."""
    weights = {}
    for name, value in shapes.items():
        if not value.is_floating_point():
            weights[name] = value.clone()
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        draw = torch.rand(value.shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            weights[name] = 0.5 + draw
        elif "embed" in name:
            weights[name] = draw
        elif re.search(r"(^|\.)query\.\d+$", name):
            weights[name] = 2 * draw - 1
        elif value.dim() >= 2:
            bound = value[0].numel() ** -0.5
            weights[name] = (2 * draw - 1) * bound
        elif name.endswith(".weight"):  # a 1-D weight: a LayerNorm or BatchNorm scale
            weights[name] = 1 + 0.2 * (draw - 0.5)
        else:
            weights[name] = 0.2 * (draw - 0.5)
    return weights


def pipeline_seeded_weights(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``seeded_weights`` for an official pipeline (``backbone.``, ``neck.``, ``reconstruction.``), the backbone's
    rounded to float32: a backbone weight file is loaded into a float32 timm network before any ``.double()``, so
    only float32-exact numbers reach it unchanged."""
    return {name: value.float().double() if name.startswith("backbone.") and value.is_floating_point() else value
            for name, value in seeded_weights(shapes).items()}


def regenerated_weights(shapes: dict, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A recording's weights from its ``shapes`` (name → (shape, dtype)) and its calibrated backbone statistics."""
    weights = pipeline_seeded_weights({name: torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
                                       for name, (shape, dtype) in shapes.items()})
    weights.update({name: value.double() for name, value in statistics.items()})
    return weights


def save_backbone_file(weights: dict[str, torch.Tensor], path) -> None:
    """The ``backbone.`` entries as a weight file in the lukemelas layout, as the official b4 file has it."""
    torch.save({name.removeprefix("backbone."): value for name, value in weights.items()
                if name.startswith("backbone.")}, path)


def fixed_inputs() -> dict[str, torch.Tensor]:
    """Features of B query, B synthetic and B prompt images (C×g×g, float64) and the synthetic masks (B×1×S×S)."""
    s = FIXTURE_SETTINGS
    generator = torch.Generator().manual_seed(19)
    shape = (s["batch"], s["channels"], s["grid"], s["grid"])
    features = {name: 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
                for name in ("query", "synthetic", "prompt")}
    size = s["image_size"]
    features["mask"] = (torch.rand((s["batch"], 1, size, size), generator=generator) > 0.8).double()
    return features


def fixed_images() -> torch.Tensor:
    """B images in [0, 1] (float64, B×3×S×S) for the CRAD recording: smooth random fields, so the backbone sees
    structure at every scale rather than pixel noise alone."""
    s = CRAD_FIXTURE_SETTINGS
    generator = torch.Generator().manual_seed(24)
    coarse = torch.rand((s["batch"], 3, 8, 8), generator=generator, dtype=torch.float64)
    fine = torch.rand((s["batch"], 3, s["image_size"], s["image_size"]), generator=generator, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(coarse, size=(s["image_size"],) * 2, mode="bicubic", align_corners=False)
    return (0.8 * smooth + 0.2 * fine).clamp(0, 1)


def fingerprint(tensor: torch.Tensor, picks: int = 16) -> torch.Tensor:
    """Sum, sum of squares and `picks` evenly spaced entries of a tensor, float64: 16 tell two updated weights
    apart; a few thousand stand for a large intermediate without storing all of it."""
    flat = tensor.detach().double().flatten()
    entries = flat[torch.linspace(0, flat.numel() - 1, picks).long()] if flat.numel() else flat
    return torch.cat([flat.sum()[None], flat.pow(2).sum()[None], entries])


def patchcore_images(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three training and three test images in [0, 1] (float32, 3×3×S×S) for the PatchCore recording: smooth
    random fields; the test images are training-like fields with a bright square pasted into two of them."""
    generator = torch.Generator().manual_seed(2022)
    coarse = torch.rand((6, 3, 8, 8), generator=generator)
    fine = torch.rand((6, 3, size, size), generator=generator)
    images = 0.7 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") + 0.3 * fine
    images[4, :, 10:26, 30:46] = 1.0
    images[5, :, 40:52, 8:20] = 0.0
    return images[:3].contiguous(), images[3:].contiguous()
