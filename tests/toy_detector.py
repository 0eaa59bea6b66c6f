"""A statistic-only detector written against the contract, as a memory-bank detector is (PatchCore-like, on
raw pixels): the model keeps the colours of every 8×8 patch of the training images and scores a patch by
the distance to its nearest stored colour; nothing is trained by gradient."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import DEFAULT_IMAGE_SIZE, AnomalyDetector
from lightning_modules.distributed import gather_samples
from networks.anomaly_model import AnomalyModel, AnomalyOutput

PATCH = 8


class PatchColourMemory(AnomalyModel):
    def __init__(self, image_size: int, bank_size: int) -> None:
        super().__init__(image_size)
        self.register_buffer("memory_bank", torch.zeros(bank_size, 3))
        self.register_buffer("fitted_patches", torch.zeros((), dtype=torch.long))

    def statistics_fitted(self) -> bool:
        return bool(self.fitted_patches > 0)

    def forward(self, images: Tensor) -> AnomalyOutput:
        patches = F.avg_pool2d(images.float(), PATCH)  # B×3×h×w
        b, _, h, w = patches.shape
        colours = patches.permute(0, 2, 3, 1).reshape(-1, 3)
        nearest = torch.cdist(colours, self.memory_bank).amin(dim=1).view(b, 1, h, w)
        anomaly_map = F.interpolate(nearest, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(-3, -2, -1)))


class PatchColourDetector(AnomalyDetector):
    """Nearest stored patch colour.

    Args:
        image_size: taken from data.image_size; leave unset.
        bank_size: how many training patch colours the memory keeps (a seeded random subset).
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
    """

    fit_only: ClassVar[bool] = True

    def __init__(self, image_size: int | None = None, bank_size: int = 4096, threshold_fpr: float = 0.05) -> None:
        super().__init__(threshold_fpr=threshold_fpr)
        self.save_hyperparameters()
        self.model = PatchColourMemory(image_size or DEFAULT_IMAGE_SIZE, bank_size)
        self._colours: list[Tensor] = []

    def fit_step(self, batch: dict[str, Any]) -> None:
        self._colours.append(F.avg_pool2d(batch["image"].float(), PATCH).permute(0, 2, 3, 1).reshape(-1, 3))

    def finish_fit(self) -> None:
        colours = gather_samples(torch.cat(self._colours))
        self._colours = []
        chosen = torch.randperm(colours.shape[0], generator=torch.Generator().manual_seed(0))
        chosen = chosen[: self.hparams.bank_size].to(colours.device)
        self.model.memory_bank[: chosen.numel()].copy_(colours[chosen])
        self.model.memory_bank[chosen.numel():].copy_(colours[chosen[0]])  # fewer patches than slots: repeat one
        self.model.fitted_patches.fill_(colours.shape[0])
