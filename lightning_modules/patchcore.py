"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features, fitted in one pass, no optimiser.

The model (``networks.patchcore.PatchCoreModel``) holds the backbone, the bank and the scoring; this module is
the fitting pass: each training image's patch features are kept in host memory (in the bank's dtype), gathered
once across processes (to host memory, in chunks), put in dataset order, and subsampled by the greedy k-center
coreset per category (or over all categories for a unified bank) on the device. The projection and the first
center are drawn from ``coreset_seed``, so one process and several choose the same bank.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_modules.base import AnomalyDetector
from lightning_modules.distributed import gather_objects, gather_rows_to_host
from networks.patchcore import (
    BANK_DTYPES,
    PatchCoreModel,
    coreset_peak_bytes,
    k_center_greedy,
    projection_dimension,
    sparse_random_projection,
)

log = logging.getLogger(__name__)


class PatchCore(AnomalyDetector):
    """PatchCore: nearest-neighbour distance to a coreset of normal patch features.

    Args:
        backbone: timm name of the frozen feature extractor (anomalib's default: wide_resnet50_2).
        layers: the two feature layers, finer first (layer2 + layer3).
        pretrained: true (fail without weights), "auto" (random weights with a warning), "file" (weights_file
            only) or false.
        weights_file: a local weights file for the backbone.
        image_size: taken from data.image_size; leave unset.
        num_neighbors: bank neighbours that re-weight the image score (9, the paper's eq. 7; 1 = the plain max).
        coreset_ratio: fraction of the training patches kept in the bank (0.1; 1.0 keeps every patch, unsorted).
        bank: per_category (one bank per product, searched by the image's category: the paper's protocol) or
            unified (one bank for all categories).
        bank_dtype: float32 or float16 (half the memory; distances are computed in float32).
        projection_eps: ε of the Johnson–Lindenstrauss dimension of the coreset's random projection (0.9).
        coreset_seed: seed of the projection and of the first coreset center.
        coreset_chunk: rows projected and compared at a time during the coreset selection.
        search_chunk: bank rows compared at a time when scoring.
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
        max_maps_per_category: how many test maps per category are saved as images.
    """

    fit_only: ClassVar[bool] = True

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: list[str] | None = None,
        pretrained: bool | str = True,
        weights_file: str | None = None,
        image_size: int | None = None,
        num_neighbors: int = 9,
        coreset_ratio: float = 0.1,
        bank: str = "per_category",
        bank_dtype: str = "float32",
        projection_eps: float = 0.9,
        coreset_seed: int = 0,
        coreset_chunk: int = 4096,
        search_chunk: int = 2048,
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category)
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must lie in (0, 1], got {coreset_ratio}")
        self.save_hyperparameters()
        self.model = PatchCoreModel(
            backbone=backbone, layers=layers or ["layer2", "layer3"], pretrained=pretrained,
            weights_file=weights_file, image_size=image_size or 224, num_neighbors=num_neighbors, bank=bank,
            bank_dtype=bank_dtype, search_chunk=search_chunk,
        )
        self.weights_source = self.model.weights_source
        self._kept: list[tuple[Tensor, Tensor, list[str]]] = []

    def fit_step(self, batch: dict[str, Any]) -> None:
        """Keep the batch's patch features in host memory, in the bank's dtype."""
        patches = self.model.patch_features(batch["image"]).to("cpu", BANK_DTYPES[self.hparams.bank_dtype])
        self._kept.append((batch["index"].cpu(), patches, list(batch["category"])))

    def finish_fit(self) -> None:
        """Gather every process's patches once (host memory), order them by image, choose the coreset(s)."""
        if not self._kept:
            raise RuntimeError("PatchCore's fitting pass saw no training image")
        indices = gather_rows_to_host(torch.cat([index for index, _, _ in self._kept]), self.device)
        patches = gather_rows_to_host(torch.cat([p for _, p, _ in self._kept]), self.device)
        categories = gather_objects([c for _, _, names in self._kept for c in names])
        self._kept = []
        order = torch.argsort(indices)
        patches, categories = patches[order], [categories[i] for i in order.tolist()]
        names = sorted(set(categories))
        per_category = self.hparams.bank == "per_category"
        bank_names = names if per_category else ["all"]
        banks, owners = [], []
        for owner, name in enumerate(bank_names):
            rows = patches[torch.tensor([c == name for c in categories])] if per_category else patches
            rows = rows.flatten(0, 1)
            banks.append(rows[self.coreset(rows)])
            owners.append(torch.full((banks[-1].shape[0],), owner, dtype=torch.long))
        self.model.set_memory_bank(torch.cat(banks), torch.cat(owners), bank_names)
        self.model.record_fitted_settings()

    def coreset(self, rows: Tensor) -> Tensor:
        """Indices of the rows kept: all of them at ratio 1.0, else a greedy k-center coreset on the device."""
        samples = rows.shape[0]
        size = max(1, int(samples * self.hparams.coreset_ratio))
        if size >= samples:
            return torch.arange(samples)
        generator = torch.Generator().manual_seed(self.hparams.coreset_seed)
        components = projection_dimension(samples, self.hparams.projection_eps)
        projection = sparse_random_projection(rows.shape[1], components, generator)
        start = int(torch.randint(samples, (1,), generator=generator))
        log.info("PatchCore coreset: %d of %d patches, projected to %d dimensions, working memory %.1f MiB",
                 size, samples, components,
                 coreset_peak_bytes(samples, components, self.hparams.coreset_chunk, rows.shape[1]) / 2**20)
        return k_center_greedy(rows, size, projection, start, self.hparams.coreset_chunk, self.device)

    def run_info(self) -> dict[str, Any]:
        return {**super().run_info(), "bank": self.model.bank, "bank_size": int(self.model.memory_bank.shape[0]),
                "bank_dtype": self.hparams.bank_dtype, "bank_categories": list(self.model.category_names),
                "coreset_ratio": self.hparams.coreset_ratio}
