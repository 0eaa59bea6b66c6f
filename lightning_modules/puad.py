"""PUAD (Sugawara & Kamoi, 2024): EfficientAD plus a global-feature Mahalanobis score for logical anomalies.

Spec: ``../shared/specs/puad_efficientad.md`` §6. EfficientAD is the "picturable" detector (its
maps find local, structural defects); the "unpicturable" detector is a Gaussian over one global
feature per image (the student's teacher-imitating half, average-pooled), which catches wrong
counts or arrangements that no local patch shows. Nothing is retrained: after EfficientAD's own
calibration, the Gaussian is fitted on the training images and both image scores are
z-normalised with the validation images' statistics, then added.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_modules.base import DEFAULT_IMAGE_SIZE, DetectorOutput
from lightning_modules.efficientad import TEACHER_CHANNELS, EfficientAD
from networks.puad import MahalanobisScorer

FEATURE_SOURCES = ("student", "teacher")
SCORE_MODES = ("combined", "picturable", "unpicturable")


class PUAD(EfficientAD):
    """EfficientAD + Mahalanobis distance of global features; the image score depends on ``score_mode``.

    ``feature_source``: "student" (pooled S(I)[:, :384], the paper's) or "teacher" (pooled
    normalised teacher output). ``score_mode``: "combined" = z_E + z_M (the paper's);
    "picturable" = the EfficientAD score s_E alone; "unpicturable" = the Mahalanobis distance d
    alone. The anomaly map is always EfficientAD's, so pixel metrics do not depend on the mode.
    """

    def __init__(
        self,
        model_size: Literal["small", "medium"] = "small",
        teacher_weights: str | None = None,
        teacher_pretrained: bool | str = True,
        penalty_dir: str | None = None,
        require_penalty: bool = False,
        penalty_num_workers: int = 4,
        image_size: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_decay_fraction: float = 0.95,
        hard_quantile: float = 0.999,
        q_low: float = 0.9,
        q_high: float = 0.995,
        ae_augmentation: bool = True,
        feature_source: Literal["student", "teacher"] = "student",
        score_mode: Literal["combined", "picturable", "unpicturable"] = "combined",
        max_maps_per_category: int = 6,
    ) -> None:
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        # The EfficientAD arguments are repeated (not *args/**kwargs) so the CLI and --help list them.
        super().__init__(
            model_size=model_size, teacher_weights=teacher_weights, teacher_pretrained=teacher_pretrained,
            penalty_dir=penalty_dir, require_penalty=require_penalty, penalty_num_workers=penalty_num_workers, image_size=image_size, lr=lr,
            weight_decay=weight_decay, lr_decay_fraction=lr_decay_fraction, hard_quantile=hard_quantile,
            q_low=q_low, q_high=q_high, ae_augmentation=ae_augmentation, max_maps_per_category=max_maps_per_category,
        )
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {FEATURE_SOURCES}, got {feature_source!r}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.save_hyperparameters()
        self.scorer = MahalanobisScorer(TEACHER_CHANNELS)
        # mean_E, std_E (EfficientAD score), mean_d, std_d (Mahalanobis) on validation; std 0 = not fitted.
        self.register_buffer("score_statistics", torch.zeros(4, dtype=torch.float64))
        self.register_buffer("gaussian_fit_images", torch.zeros((), dtype=torch.long))

    @property
    def score_statistics_fitted(self) -> bool:
        return bool(self.score_statistics[1] > 0 and self.score_statistics[3] > 0)

    # ------------------------------------------------------------------ features and scores
    def global_features(self, outputs: dict[str, Tensor]) -> Tensor:
        """B×384: the chosen feature map average-pooled over all positions (spec §6.1)."""
        if self.hparams.feature_source == "student":
            features = outputs["student"][:, :TEACHER_CHANNELS]
        else:
            features = outputs["teacher"]
        return features.float().mean(dim=(2, 3))

    def efficientad_scores(self, map_st: Tensor, map_ae: Tensor) -> Tensor:
        """s_E: max of EfficientAD's combined normalised map, per image (maps B×1×S×S or B×S²)."""
        return self.combined_map(map_st, map_ae).flatten(1).amax(dim=1)

    def image_scores(self, efficientad_score: Tensor, distance: Tensor) -> Tensor:
        mode = self.hparams.score_mode
        if mode == "picturable":
            return efficientad_score
        if not self.scorer.is_fitted:
            raise RuntimeError(f"PUAD score_mode={mode!r} needs the Gaussian, which is fitted in calibration "
                               "(trainer.validate after training); this model has none.")
        if mode == "unpicturable":
            return distance
        if not self.score_statistics_fitted:
            raise RuntimeError("PUAD score_mode='combined' needs the validation score statistics, which are "
                               "fitted in calibration (trainer.validate after training); this model has none.")
        mean_e, std_e, mean_d, std_d = self.score_statistics
        combined = (efficientad_score.double() - mean_e) / std_e + (distance.double() - mean_d) / std_d
        return combined.float()

    def predict(self, images: Tensor) -> DetectorOutput:
        outputs = self.network_outputs(images)
        anomaly_map = self.combined_map(outputs["map_st"], outputs["map_ae"])
        efficientad_score = anomaly_map.flatten(1).amax(dim=1)
        needs_distance = self.hparams.score_mode != "picturable"
        distance = self.scorer(self.global_features(outputs)) if needs_distance else efficientad_score
        return DetectorOutput(anomaly_map=anomaly_map, image_score=self.image_scores(efficientad_score, distance))

    # ------------------------------------------------------------------ calibration
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = self.network_outputs(batch["image"][batch["label"] == 0])
        return {"map_st": outputs["map_st"].flatten(1), "map_ae": outputs["map_ae"].flatten(1),
                "feature": self.global_features(outputs)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Map quantiles, then the Gaussian on the TRAIN images (§6.2), then validation z-statistics (§6.4)."""
        super().fit_calibration(collected)
        train_features = self.collect(
            self.trainer.datamodule.statistics_dataloader(),
            lambda batch: {"feature": self.global_features(self.network_outputs(batch["image"]))},
        )["feature"]
        self.scorer.fit(train_features)
        self.gaussian_fit_images.fill_(train_features.shape[0])

        efficientad_score = self.efficientad_scores(collected["map_st"], collected["map_ae"]).double()
        distance = self.scorer(collected["feature"].to(self.device)).double()
        statistics = torch.stack([efficientad_score.mean(), efficientad_score.std(correction=0),
                                  distance.mean(), distance.std(correction=0)])
        self.score_statistics.copy_(statistics.to(self.score_statistics.device))

    def is_calibrated(self) -> bool:
        return super().is_calibrated() and self.scorer.is_fitted and self.score_statistics_fitted

    def run_info(self) -> dict[str, Any]:
        mean_e, std_e, mean_d, std_d = self.score_statistics.tolist()
        return {**super().run_info(), "feature_source": self.hparams.feature_source,
                "score_mode": self.hparams.score_mode, "gaussian_fitted": self.scorer.is_fitted,
                "gaussian_fit_images": int(self.gaussian_fit_images),
                "score_statistics_fitted": self.score_statistics_fitted,
                "score_statistics": {"efficientad": {"mean": mean_e, "std": std_e},
                                     "mahalanobis": {"mean": mean_d, "std": std_d}}}
