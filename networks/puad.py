"""PUAD's "unpicturable" detector: a Gaussian in a global feature space, scored by Mahalanobis distance.

Spec: ``../shared/specs/puad_efficientad.md`` §6. The fit is exactly the official code's:
scikit-learn's Ledoit-Wolf shrinkage covariance (default options) and numpy's Moore-Penrose
pseudo-inverse, both in float64. The fitted mean and precision are buffers, so a checkpoint holds
them and an evaluation in a fresh process scores identically.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn


class MahalanobisScorer(nn.Module):
    """d(f) = sqrt(max(0, (f − m)ᵀ P (f − m))) with m, P fitted on normal features.

    Buffers are float64: the precision matrix of a shrunk covariance can be badly conditioned,
    and D = 384 makes the cost of double precision negligible.
    """

    def __init__(self, dim: int = 384) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("precision", torch.zeros(dim, dim, dtype=torch.float64))

    @property
    def is_fitted(self) -> bool:
        return bool(self.precision.abs().sum() > 0)

    @torch.no_grad()
    def fit(self, features: Tensor) -> None:
        """Fit on N×D features of normal images (N ≥ 2)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected N×{self.dim} features, got shape {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(f"a Gaussian fit needs at least 2 feature vectors, got {features.shape[0]}")
        values = features.detach().to("cpu", torch.float64).numpy()
        estimate = LedoitWolf().fit(values)
        precision = np.linalg.pinv(estimate.covariance_)
        self.mean.copy_(torch.from_numpy(estimate.location_).to(self.mean.device))
        self.precision.copy_(torch.from_numpy(precision).to(self.precision.device))

    def forward(self, features: Tensor) -> Tensor:
        """Mahalanobis distance of each row of N×D ``features`` (float32 result, computed in float64)."""
        centred = features.to(torch.float64) - self.mean
        squared = torch.einsum("nd,de,ne->n", centred, self.precision, centred)
        return squared.clamp_min(0).sqrt().float()
