"""What the official-code recordings and their tests share: the settings, the inputs, the weights, fingerprints.

Weights are a function of each official parameter's name and shape (a generator seeded by the name's CRC32),
so the fixture needs no weight file: the test regenerates the same numbers and maps them to our names.
"""

from __future__ import annotations

import zlib

import torch

# A small OneNIP: the official module fixes the hidden width at 256 (its final attention is hard-coded); fewer
# channels, layers and a narrower FFN keep the recording small. 96 px → a 6×6 token grid, neighbour window 3.
FIXTURE_SETTINGS = {"channels": 16, "grid": 6, "image_size": 96, "layers": 2, "ffn_dim": 64, "batch": 2}


def seeded_weights(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 weights for every entry of a state dict: U(−1/√fan_in, 1/√fan_in) for matrices and kernels,
    U(−0.1, 0.1) for biases, 1 + U(−0.1, 0.1) for norm scales, U(0, 1) for positional tables, positive BN
    variances; the BN batch counter is copied."""
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
        elif value.dim() >= 2:
            bound = value[0].numel() ** -0.5
            weights[name] = (2 * draw - 1) * bound
        elif name.endswith(".weight"):  # a 1-D weight: a LayerNorm or BatchNorm scale
            weights[name] = 1 + 0.2 * (draw - 0.5)
        else:
            weights[name] = 0.2 * (draw - 0.5)
    return weights


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


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Sum, sum of squares and 16 fixed entries of a tensor, float64: enough to tell two updated weights apart."""
    flat = tensor.detach().double().flatten()
    picks = flat[torch.linspace(0, flat.numel() - 1, 16).long()] if flat.numel() else flat
    return torch.cat([flat.sum()[None], flat.pow(2).sum()[None], picks])
