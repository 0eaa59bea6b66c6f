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

from networks.anomaly_model import AnomalyOutput
from networks.efficientad import TEACHER_CHANNELS, EfficientADModel


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


FEATURE_SOURCES = ("student", "teacher")
SCORE_MODES = ("combined", "picturable", "unpicturable")


class PUADModel(EfficientADModel):
    """EfficientAD plus the Mahalanobis score of one global feature per image (spec §6).

    ``feature_source``: "student" (pooled S(I)[:, :384], the paper's) or "teacher" (pooled
    normalised teacher output); the Gaussian is fitted on that feature, so it is a fitted setting
    (a checkpoint fitted with one cannot be read with the other). ``score_mode``: "combined" =
    z_E + z_M (the paper's); "picturable" = the EfficientAD score s_E alone; "unpicturable" = the
    Mahalanobis distance d alone. It changes no fitted statistic, so one calibrated model can be
    scored all three ways: a decision threshold is fitted for each mode (``mode_thresholds``), and
    the current mode's is the one in use. The anomaly map is always EfficientAD's.

    Extra fitted buffers: the Gaussian (``scorer``), ``score_statistics`` (mean_E, std_E, mean_d,
    std_d on validation images, float64; std 0 = not fitted) and ``gaussian_fit_images``.
    """

    FITTED_SETTINGS = ("feature_source",)

    def __init__(self, model_size: str = "small", image_size: int = 256, feature_source: str = "student",
                 score_mode: str = "combined") -> None:
        super().__init__(model_size, image_size)
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.feature_source, self.score_mode = feature_source, score_mode
        self.scorer = MahalanobisScorer(TEACHER_CHANNELS)
        self.register_buffer("score_statistics", torch.zeros(4, dtype=torch.float64))
        self.register_buffer("gaussian_fit_images", torch.zeros((), dtype=torch.long))
        # Per score mode (SCORE_MODES order): image_threshold, normal_image_score; NaN = not fitted.
        self.register_buffer("mode_thresholds", torch.full((len(SCORE_MODES), 2), float("nan")))

    @property
    def score_statistics_fitted(self) -> bool:
        return bool(self.score_statistics[1] > 0 and self.score_statistics[3] > 0)

    def statistics_fitted(self) -> bool:
        return super().statistics_fitted() and self.scorer.is_fitted and self.score_statistics_fitted

    def global_features(self, outputs: dict[str, Tensor]) -> Tensor:
        """B×384: the chosen feature map average-pooled over all positions (spec §6.1)."""
        features = outputs["student"][:, :TEACHER_CHANNELS] if self.feature_source == "student" else outputs["teacher"]
        return features.float().mean(dim=(2, 3))

    @torch.no_grad()
    def fit_score_statistics(self, train_features: Tensor, validation_maps: tuple[Tensor, Tensor],
                             validation_features: Tensor) -> None:
        """The Gaussian on the TRAIN images' features (§6.2), then both scores' z-statistics on validation (§6.4)."""
        self.scorer.fit(train_features)
        self.gaussian_fit_images.fill_(train_features.shape[0])
        efficientad_score = self.combined_map(*validation_maps).flatten(1).amax(dim=1).double()
        distance = self.scorer(validation_features.to(self.score_statistics.device)).double()
        statistics = torch.stack([efficientad_score.mean(), efficientad_score.std(correction=0),
                                  distance.mean(), distance.std(correction=0)])
        self.score_statistics.copy_(statistics.to(self.score_statistics.device))

    def scores_of_every_mode(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The anomaly map and the image score of each score mode, from one pass of the networks."""
        outputs = self.raw_maps(images)
        anomaly_map = self.combined_map(outputs["map_st"], outputs["map_ae"])
        efficientad_score = anomaly_map.flatten(1).amax(dim=1)
        distance = self.scorer(self.global_features(outputs))
        return anomaly_map, {mode: self.image_scores(efficientad_score, distance, mode) for mode in SCORE_MODES}

    @torch.no_grad()
    def fit_mode_thresholds(self, scores: dict[str, Tensor], anomaly_maps_max: Tensor, anomaly_maps_median: Tensor,
                            false_positive_rate: float) -> None:
        """The decision threshold of every score mode on the same validation images; the current mode's is used."""
        for row, mode in enumerate(SCORE_MODES):
            self.fit_decision_threshold(scores[mode], anomaly_maps_max, anomaly_maps_median, false_positive_rate)
            self.mode_thresholds[row, 0], self.mode_thresholds[row, 1] = self.image_threshold, self.normal_image_score
        self.use_mode_threshold()

    @torch.no_grad()
    def use_mode_threshold(self) -> None:
        """Put the current score mode's threshold in place (after fitting, and after loading a checkpoint)."""
        threshold, normal = self.mode_thresholds[SCORE_MODES.index(self.score_mode)]
        self.image_threshold.fill_(float(threshold))
        self.normal_image_score.fill_(float(normal))

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)  # runs after this module's buffers are loaded
        if bool(torch.isfinite(self.mode_thresholds).all()):
            self.use_mode_threshold()

    def image_scores(self, efficientad_score: Tensor, distance: Tensor, mode: str | None = None) -> Tensor:
        mode = mode or self.score_mode
        if mode == "picturable":
            return efficientad_score
        if mode == "unpicturable":
            return distance
        statistics = self.score_statistics  # mean_E, std_E, mean_d, std_d
        combined = ((efficientad_score.double() - statistics[0]) / statistics[1]
                    + (distance.double() - statistics[2]) / statistics[3])
        return combined.float()

    def forward(self, images: Tensor) -> AnomalyOutput:
        outputs = self.raw_maps(images)
        anomaly_map = self.combined_map(outputs["map_st"], outputs["map_ae"])
        efficientad_score = anomaly_map.flatten(1).amax(dim=1)
        if self.score_mode == "picturable":
            return AnomalyOutput(anomaly_map, efficientad_score)
        distance = self.scorer(self.global_features(outputs))
        return AnomalyOutput(anomaly_map, self.image_scores(efficientad_score, distance))
