"""Fitted-statistic helpers every detector shares: channel moments from float64 sums and quantiles.

Written by hand because no library does these exactly as the reference codes do: channel mean and
population std accumulated as float64 sums of x and x² over every image and position (one pass,
any number of processes), and two quantile flavours that both reproduce ``torch.quantile``'s linear
interpolation beyond its 2**24-element input limit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TORCH_QUANTILE_LIMIT = 2**24  # torch.quantile refuses larger inputs


def channel_sums(features: Tensor) -> dict[str, Tensor]:
    """Per-image float64 sums of x and x² per channel, and the positions counted: B×C×H×W → three tensors.

    Gather these over every batch (and process) and hand them to ``channel_moments``.
    """
    values = features.double()
    count = torch.full((values.shape[0],), values.shape[2] * values.shape[3], dtype=torch.float64,
                       device=values.device)
    return {"sum": values.sum(dim=(2, 3)), "sum_sq": (values**2).sum(dim=(2, 3)), "count": count}


def channel_moments(sums: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Channel mean and population std (float64, C each) from the gathered output of ``channel_sums``."""
    count = sums["count"].sum()
    mean = sums["sum"].sum(0) / count
    std = (sums["sum_sq"].sum(0) / count - mean**2).clamp_min(0).sqrt()
    return mean, std


def exact_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of all entries, with torch.quantile's linear interpolation but no size limit.

    A batch of 16 EfficientAD student maps at 256 px has 19M entries; kthvalue selects the two
    order statistics exactly where torch.quantile would refuse.
    """
    flat = values.detach().flatten().float()
    position = q * (flat.numel() - 1)
    lower = math.floor(position)
    low = torch.kthvalue(flat, lower + 1).values
    fraction = position - lower
    if fraction == 0 or lower + 1 >= flat.numel():
        return low
    high = torch.kthvalue(flat, lower + 2).values
    return torch.lerp(low, high, fraction)


def subsampled_quantiles(values: Tensor, levels: list[float], seed: int = 0) -> Tensor:
    """torch.quantile of all entries at `levels`; above 2**24 entries, of a seeded random 2**24 of them.

    This is what the ULSAD reference code does (it subsamples to stay under torch.quantile's limit);
    ``exact_quantile`` is the exact alternative.
    """
    flat = values.detach().flatten().float()
    if flat.numel() > TORCH_QUANTILE_LIMIT:
        generator = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=generator, device=flat.device)[:TORCH_QUANTILE_LIMIT]]
    return torch.quantile(flat, torch.tensor(levels, device=flat.device))
