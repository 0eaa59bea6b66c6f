"""A cache of a frozen network's output per training image, for images that are never augmented.

A frozen backbone gives the same features for the same un-augmented image in every epoch, so it
runs once per image instead of once per epoch (ULSAD's features; OneNIP's clean query and prompt;
CRAD). Keys are the dataset's image indices. Not for augmented or synthetic images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class FrozenFeatureCache:
    """``cache(indices, images, compute)``: ``compute(images)`` for a batch, computed only for unseen indices."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._features: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def clear(self) -> None:
        self._features.clear()

    def __call__(self, indices: Tensor, images: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        if not self.enabled:
            return compute(images)
        keys = indices.tolist()
        missing = [position for position, key in enumerate(keys) if key not in self._features]
        if missing:
            with torch.no_grad():
                computed = compute(images[missing])
            for position, features in zip(missing, computed):
                self._features[keys[position]] = features.detach()
        return torch.stack([self._features[key] for key in keys]).to(images.device)
