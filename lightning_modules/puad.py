"""PUAD (Sugawara & Kamoi, 2024): EfficientAD plus a global-feature Mahalanobis score for logical anomalies.

Spec: ``../shared/specs/puad_efficientad.md`` §6. EfficientAD is the "picturable" detector (its
maps find local, structural defects); the "unpicturable" detector is a Gaussian over one global
feature per image (the student's teacher-imitating half, average-pooled), which catches wrong
counts or arrangements that no local patch shows. Nothing is retrained: after EfficientAD's own
calibration, the Gaussian is fitted on the training images and both image scores are
z-normalised with the validation images' statistics, then added (``networks.puad.PUADModel``).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_modules.base import DEFAULT_IMAGE_SIZE, require_finite_scores
from lightning_modules.efficientad import EfficientAD
from networks.puad import SCORE_MODES, PUADModel


class PUAD(EfficientAD):
    """EfficientAD + Mahalanobis distance of global features; the image score depends on ``score_mode``.

    Args:
        model_size: "small" (PDN-S) or "medium" (PDN-M).
        teacher_weights: the distilled teacher PDN file (from distill.py, nelson1425 or anomalib layouts).
        teacher_pretrained: true (teacher_weights required), "auto" (random teacher with a warning if none)
            or false (a weights-free random teacher).
        penalty_dir: a folder of natural images (ImageNet train, Imagenette) for the penalty term; null drops it.
        require_penalty: refuse to start without penalty_dir.
        penalty_num_workers: data-loader workers for the penalty images.
        image_size: taken from data.image_size; leave unset.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_decay_fraction: the learning rate drops ×0.1 after this fraction of the steps.
        hard_quantile: the hard-feature loss keeps the squared differences above this quantile.
        q_low: lower map quantile of the normalisation, fitted on validation normal images.
        q_high: upper map quantile of the normalisation.
        ae_augmentation: colour-augment the autoencoder branch's images (spec §3.3).
        feature_source: "student" (pooled S(I)[:, :384], the paper's) or "teacher" (pooled normalised teacher
            output): the global feature the Gaussian is fitted on. A checkpoint is read only with its own.
        score_mode: "combined" = z_E + z_M (the paper's), "picturable" = the EfficientAD score alone,
            "unpicturable" = the Mahalanobis distance alone. The anomaly map is always EfficientAD's.
        threshold_fpr: target false-positive rate of the decision threshold on validation normal images.
        max_maps_per_category: how many test maps per category are saved as images.
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
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        self._puad_settings = {"feature_source": feature_source, "score_mode": score_mode}
        # The EfficientAD arguments are repeated (not *args/**kwargs) so the CLI and --help list them.
        super().__init__(
            model_size=model_size, teacher_weights=teacher_weights, teacher_pretrained=teacher_pretrained,
            penalty_dir=penalty_dir, require_penalty=require_penalty, penalty_num_workers=penalty_num_workers,
            image_size=image_size, lr=lr, weight_decay=weight_decay, lr_decay_fraction=lr_decay_fraction,
            hard_quantile=hard_quantile, q_low=q_low, q_high=q_high, ae_augmentation=ae_augmentation,
            threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category,
        )
        self.save_hyperparameters()

    def build_model(self, model_size: str, image_size: int) -> PUADModel:
        return PUADModel(model_size, image_size, **self._puad_settings)

    # ------------------------------------------------------------------ calibration
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = self.model.raw_maps(batch["image"][batch["label"] == 0])
        return {"map_st": outputs["map_st"].flatten(1), "map_ae": outputs["map_ae"].flatten(1),
                "feature": self.model.global_features(outputs)}

    def fit_calibration(self, collected: dict[str, Tensor], training_batches) -> None:
        """Map quantiles, then the Gaussian on the TRAIN images (§6.2), then validation z-statistics (§6.4)."""
        super().fit_calibration(collected, training_batches)
        model = self.model
        train_features = self.collect(
            training_batches, lambda batch: {"feature": model.global_features(model.raw_maps(batch["image"]))},
        )["feature"]
        model.fit_score_statistics(train_features, (collected["map_st"], collected["map_ae"]), collected["feature"])

    def fit_threshold(self, validation_batches) -> None:
        """A decision threshold for every score mode (one pass): the same model can be evaluated in each."""
        def scores(batch):
            normal = batch["label"] == 0
            anomaly_map, by_mode = self.model.scores_of_every_mode(batch["image"][normal])
            maps = anomaly_map.float().flatten(1)
            return {**{f"score_{mode}": value.float() for mode, value in by_mode.items()},
                    "max": maps.amax(dim=1), "median": maps.median(dim=1).values}
        values = require_finite_scores(self.collect(validation_batches, scores))
        by_mode = {mode: values[f"score_{mode}"] for mode in SCORE_MODES}
        self.model.fit_mode_thresholds(by_mode, values["max"], values["median"], self.threshold_fpr)

    def run_info(self) -> dict[str, Any]:
        model = self.model
        mean_e, std_e, mean_d, std_d = model.score_statistics.tolist()
        return {**super().run_info(), "feature_source": model.feature_source,
                "score_mode": model.score_mode, "gaussian_fitted": model.scorer.is_fitted,
                "gaussian_fit_images": int(model.gaussian_fit_images),
                "score_statistics_fitted": model.score_statistics_fitted,
                "score_statistics": {"efficientad": {"mean": mean_e, "std": std_e},
                                     "mahalanobis": {"mean": mean_d, "std": std_d}}}
