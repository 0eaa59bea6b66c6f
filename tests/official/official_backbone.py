"""What the CRAD and OneNIP recorders share about the official backbone (the lukemelas EfficientNet-b4 both vendor):
the official dataset's normalisation and BatchNorm statistics calibrated on a few images.

Seeded weights alone make a random b4 map every image to nearly the same features (the BN statistics do not fit
the activations, and the signal fades by ~30× at each downsampling stage); with calibrated statistics the features
differ between images as much as within one. Recorder-side only: the tests load the stored statistics.
"""

from __future__ import annotations

import re

import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # both official configs


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (images - mean) / std


def calibrated_backbone_statistics(model: torch.nn.ModuleDict, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The running mean and variance of the backbone's BatchNorm layers up to block 21 (the last one CRAD and OneNIP
    read), the exact averages (momentum None) over `images` (B×3×S×S in [0, 1]) and six blocky ones, rounded to
    float32."""
    backbone = model["backbone"]
    used = re.compile(r"^(_bn0|_blocks\.(\d|1\d|2[01])\..*)$")
    layers = {name: layer for name, layer in backbone.named_modules()
              if isinstance(layer, torch.nn.BatchNorm2d) and used.match(name)}
    for layer in layers.values():
        layer.momentum = None
        layer.reset_running_stats()
    generator = torch.Generator().manual_seed(5)
    blocky = torch.rand((6, 3, 8, 8), generator=generator, dtype=torch.float64)
    size = images.shape[-1] // 8
    images = torch.cat([images, blocky.repeat_interleave(size, 2).repeat_interleave(size, 3)])
    settings = backbone._global_params
    backbone._global_params = settings._replace(drop_connect_rate=None)  # train mode, but no random drop connect
    backbone.train()
    with torch.no_grad():
        backbone({"image": normalise(images)})
    backbone.eval()
    backbone._global_params = settings
    return {f"backbone.{name}.{statistic}": getattr(layer, statistic).float().double()
            for name, layer in layers.items() for statistic in ("running_mean", "running_var")}

