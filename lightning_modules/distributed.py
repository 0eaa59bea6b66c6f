"""Gathering per-sample results across processes: small tensors onto every device, large ones to host memory.

torchmetrics' ``gather_all_tensors`` (uneven sizes allowed) does the collective; what is added here is the
chunking: a fitted state the size of the training set (a PatchCore bank before subsampling) is gathered
``chunk_rows`` rows at a time and moved to host memory chunk by chunk, so no device ever holds more than
world size × chunk_rows rows of it, whatever the data's size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_samples(tensor: Tensor) -> Tensor:
    """Concatenate per-sample tensors of all processes (uneven sizes allowed); identity on one process."""
    if not distributed():
        return tensor
    return torch.cat(gather_all_tensors(tensor.contiguous()), dim=0)


def gather_rows_to_host(tensor: Tensor, device: torch.device, chunk_rows: int = 4096) -> Tensor:
    """Every process's rows of ``tensor`` (held in host memory, any dtype), concatenated in rank order on the
    host. The collective runs on ``device`` (NCCL needs CUDA tensors, gloo takes CPU ones) one chunk at a time."""
    if not distributed():
        return tensor.cpu()
    rows = gather_all_tensors(torch.tensor([tensor.shape[0]], device=device))
    counts = [int(count) for count in rows]
    parts: list[list[Tensor]] = [[] for _ in counts]
    for start in range(0, max(counts), chunk_rows):
        local = tensor[start:start + chunk_rows].to(device)
        for rank, chunk in enumerate(gather_all_tensors(local.contiguous())):
            if chunk.shape[0]:
                parts[rank].append(chunk.cpu())
    empty = tensor.new_zeros((0, *tensor.shape[1:]), device="cpu")
    return torch.cat([piece for rank_parts in parts for piece in rank_parts] or [empty])


def gather_objects(values: list[Any]) -> list[Any]:
    """Concatenate small Python lists (names, paths) of all processes, in rank order."""
    if not distributed():
        return list(values)
    everyone: list[list[Any]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(everyone, list(values))
    return [value for part in everyone for value in part]


__all__ = ["distributed", "gather_objects", "gather_rows_to_host", "gather_samples"]
