"""The training and evaluation path every detector shares.

A detector is a pure-torch ``AnomalyModel`` (``networks/``: it scores images alone, fitted
statistics included) wrapped by a thin subclass of ``AnomalyDetector`` that supplies the loss
(``training_step``, ``build_optimizers``) and explicit fitting hooks: ``fit_training_statistics``
(on the training images, before training) and ``calibration_step`` / ``fit_calibration`` (on
held-out normal images, after training). This class does the rest, identically for every
detector: the decision threshold (fitted on the same held-out normal images), collecting test
results across processes, per-category and mean metrics (plus the logical/structural split on
MVTec LOCO-style data), the run folder, W&B logging, the results table, and the throughput and
memory figures. Every hook also runs without a Trainer (``calibrate``), which the benchmark uses.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from abc import ABC
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics import Metric

from lightning_modules import metrics as M
from lightning_modules import reporting
from lightning_modules.distributed import distributed, gather_objects, gather_samples
from lightning_modules.progress import phase
from lightning_modules.resume import CheckpointError
from networks.anomaly_model import AnomalyModel

KIND_IDS = {"good": 0, "structural": 1, "logical": 2, "anomaly": 3}
# A detector's image_size when built in Python without one; the CLI always passes data.image_size.
DEFAULT_IMAGE_SIZE = 256


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite: training stops at once and writes no final checkpoint or metrics."""

    diverged = True  # read by the checkpoint callback: a diverged state is not worth resuming


class NotCalibrated(RuntimeError):
    """Testing a model whose post-training calibration (map quantiles, score statistics) was never fitted."""


class NonFiniteResults(RuntimeError):
    """Maps or scores that are NaN or infinite: they must never turn into metrics or fitted statistics."""


def without_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch minus the padding items a process gets when a split has fewer images than processes.

    Such a process still runs one (padding) item through every hook, so each collective call
    happens on every process; here the item is dropped, which may leave an empty batch.
    """
    padding = batch.get("padding")
    if padding is None or not bool(padding.any()):
        return batch
    keep = ~padding
    positions = keep.nonzero().flatten().tolist()
    return {key: (value[keep] if isinstance(value, Tensor) else [value[i] for i in positions])
            for key, value in batch.items()}


def require_finite_scores(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The validation scores a threshold is fitted on, refused when any is NaN or infinite."""
    if not all(bool(torch.isfinite(value).all()) for value in values.values()):
        raise NonFiniteResults("The calibrated model gives NaN or infinite scores on the validation images; "
                               "no decision threshold was fitted. The training has probably diverged.")
    return values


class TestResultStore(Metric):
    """Keeps every test image's score, label, map and mask, synchronised across processes.

    One store instead of one torchmetrics object per (category, subset, metric): the maps are the
    memory-heavy part, and here they are held once whatever the number of subsets reported.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=True)
        for name in ("indices", "scores", "labels", "maps", "masks", "has_mask", "regions", "saturation"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, indices, scores, labels, maps, masks, has_mask, regions=None, saturation=None) -> None:
        self.indices.append(indices.long())
        self.scores.append(scores.float())
        self.labels.append(labels.long())
        self.maps.append(maps.float())
        self.masks.append(masks.to(torch.uint8))
        self.has_mask.append(has_mask.bool())
        if regions is not None:
            self.regions.append(regions.to(torch.uint8))
            self.saturation.append(saturation.float())

    def compute(self) -> StoredResults:
        def cat(state):
            if isinstance(state, Tensor):  # already concatenated by the distributed sync, which turns
                return state if state.numel() else None  # a state no process filled into tensor([])
            return torch.cat(state) if state else None

        result = {name: cat(getattr(self, name)) for name in
                  ("indices", "scores", "labels", "maps", "masks", "has_mask", "regions", "saturation")}
        order = torch.argsort(result["indices"])  # the same order on one process or many
        return StoredResults({k: (v[order] if v is not None else None) for k, v in result.items()})


class StoredResults:
    """The test results as {state name: tensor}, in a box: torchmetrics squeezes every one-element
    tensor that `compute` returns in a dict to a 0-d scalar, which would lose the image axis of a
    one-image test set. It does not look inside this class."""

    def __init__(self, tensors: dict[str, Tensor | None]) -> None:
        self.tensors = tensors


class AnomalyDetector(LightningModule, ABC):
    """Base LightningModule of every detector: the shared training and evaluation path (see module docstring)."""

    model: AnomalyModel  # set by the subclass: the whole inference path and every fitted statistic
    #: Trainer settings this detector needs unless the config sets them, e.g. {"max_epochs": 1} for a
    #: statistic-only detector (a memory bank): one pass over the training images, no optimiser.
    trainer_defaults: ClassVar[dict[str, Any]] = {}
    #: Per-item fields the training loader must add (the data module's TRAINING_FIELDS), e.g. OneNIP's
    #: "prompt_image": a random normal training image of the same category.
    training_fields: ClassVar[tuple[str, ...]] = ()
    #: True for a detector with no optimiser (a memory bank): its training is ONE pass over the training images,
    #: without augmentation (``fit_step`` on each batch, then ``finish_fit`` once on every process), which
    #: train.py runs as ``trainer.predict`` (no DDP wrapper, no empty epoch, no optimiser state in any checkpoint)
    #: and ``fit_pass`` runs without a Trainer. It defines ``fit_step`` and ``finish_fit``, and neither
    #: ``training_step`` nor ``build_optimizers``; a gradient-trained detector defines those two. Checked when the
    #: class is defined.
    fit_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.fit_only:
            needed, refused = ("fit_step", "finish_fit"), ("training_step", "build_optimizers")
        else:
            needed, refused = ("training_step", "build_optimizers"), ("fit_step", "finish_fit")
        base = {name: getattr(AnomalyDetector, name, None) for name in (*needed, *refused)}
        base["training_step"] = LightningModule.training_step
        missing = [name for name in needed if getattr(cls, name) is base[name]]
        extra = [name for name in refused if getattr(cls, name) is not base[name]]
        if missing or extra:
            kind = "a fit-only detector (fit_only = True)" if cls.fit_only else "a gradient-trained detector"
            raise TypeError(f"{cls.__qualname__} is {kind}: it must define {list(needed)}"
                            + (f" and must not define {extra}" if extra else "") + f"; missing {missing}.")

    def __init__(self, threshold_fpr: float = 0.05, max_maps_per_category: int = 6) -> None:
        super().__init__()
        if not 0 < threshold_fpr < 1:
            raise ValueError(f"threshold_fpr must lie in (0, 1), got {threshold_fpr}")
        self.threshold_fpr = threshold_fpr
        self.max_maps_per_category = max_maps_per_category
        self.test_store = TestResultStore()
        self.weights_source = "n/a"
        self.test_results: dict[str, Any] | None = None
        self._calibration_outputs: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------ detector hooks
    def fit_training_statistics(self, training_batches: Iterable[dict[str, Any]]) -> None:
        """Fit statistics the training needs first, on the training images (e.g. feature standardisation)."""

    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample tensors computed on held-out normal images; gathered for ``fit_calibration``."""
        return {}

    def fit_calibration(self, collected: dict[str, Tensor], training_batches: Iterable[dict[str, Any]]) -> None:
        """Fit post-training statistics (map quantiles, score statistics) from the gathered validation tensors;
        ``training_batches`` serves the training images again for statistics that come from them (PUAD's Gaussian)."""

    def build_optimizers(self, total_steps: int) -> Any:
        """What ``configure_optimizers`` returns, for a run of ``total_steps`` optimiser steps (gradient-trained
        detectors)."""
        raise NotImplementedError

    def fit_step(self, batch: dict[str, Any]) -> None:
        """Fit-only detectors: take what the fitted state needs from one batch of training images (no gradients)."""
        raise NotImplementedError

    def finish_fit(self) -> None:
        """Fit-only detectors: build the fitted state from everything ``fit_step`` kept; runs on every process,
        so it may gather across them (``lightning_modules.distributed``)."""
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        """Facts about the run a reader of metrics.json needs (weights used, fitted-statistics status)."""
        return {"detector": type(self).__name__, "weights_source": self.weights_source}

    # ------------------------------------------------------------------ the model's contract
    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The batch fields the model declares it needs besides the image (``AnomalyModel.input_fields``);
        ``category_index`` is made from the batch's category names and the model's ``category_names``."""
        return {name: (self.category_indices(batch["category"]) if name == "category_index" else batch[name])
                for name in self.model.input_fields}

    def category_indices(self, categories: list[str]) -> Tensor:
        """Each image's category as an index into the model's ``category_names``; a category the fitted state
        does not know is an error naming it."""
        names = self.model.category_names
        unknown = sorted(set(categories) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__} was fitted on categories {names}; it has nothing for {unknown}")
        return torch.tensor([names.index(c) for c in categories], dtype=torch.long, device=self.device)

    def forward(self, images: Tensor, **fields: Tensor):
        return self.model(images, **fields)

    def is_calibrated(self) -> bool:
        """True once the model's statistics and decision threshold are fitted; testing refuses an uncalibrated model."""
        return self.model.is_calibrated()

    def configure_optimizers(self):
        return self.build_optimizers(self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ the one pass of a fit-only detector
    def fit_pass(self, training_batches: Iterable[dict[str, Any]]) -> None:
        """A fit-only detector's whole training without a Trainer: what ``trainer.predict`` runs in train.py."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for index, batch in enumerate(training_batches):
                self.predict_step(self._to_device(batch), index)
        self.on_predict_epoch_end()
        self.train(was_training)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.fit_only:
            raise RuntimeError(f"{type(self).__name__}: trainer.predict is a fit-only detector's fitting pass; score "
                               "images with evaluate.py --images (lightning_modules/prediction.py)")
        batch = without_padding(batch)
        if batch["image"].shape[0]:
            self.fit_step(batch)

    def on_predict_epoch_end(self) -> None:
        with phase("building the fitted state from the training images"), torch.inference_mode(False):
            self.finish_fit()  # outside inference mode: the fitted buffers are saved and loaded like any other

    def calibrate(self, validation_batches: Iterable[dict[str, Any]], training_batches: Iterable[dict[str, Any]]) -> None:
        """Everything fitted on held-out normal images after training, without a Trainer: the detector's
        statistics, then the decision threshold. (In a run, the validation loop does the same.)"""
        collected = self.collect(validation_batches, lambda batch: self.calibration_step(batch))
        self._fit_calibration_and_threshold(collected, training_batches, validation_batches)

    def _fit_calibration_and_threshold(self, collected, training_batches, validation_batches) -> None:
        bad = sorted(name for name, values in collected.items() if not bool(torch.isfinite(values).all()))
        if bad:
            raise NonFiniteResults(
                f"Calibration on the validation images produced NaN or infinite values in {bad}: the model's maps "
                "are not finite, so no statistics were fitted. The training has probably diverged."
            )
        self.fit_calibration(collected, training_batches)
        self.fit_threshold(validation_batches)
        self.model.record_fitted_settings()

    def fit_threshold(self, validation_batches: Iterable[dict[str, Any]]) -> None:
        """The decision threshold at ``threshold_fpr`` on the held-out normal images, through the final model."""
        def scores(batch):
            normal = batch["label"] == 0
            fields = {name: value[normal] for name, value in self.model_inputs(batch).items()}
            output = self.model(batch["image"][normal], **fields)
            maps = output.anomaly_map.float().flatten(1)
            return {"score": output.image_score.float(), "max": maps.amax(dim=1), "median": maps.median(dim=1).values}
        values = require_finite_scores(self.collect(validation_batches, scores))
        self.model.fit_decision_threshold(values["score"], values["max"], values["median"], self.threshold_fpr)

    def log_losses(self, terms: dict[str, Tensor], batch_size: int) -> Tensor:
        """Sum the loss terms (stopping on a non-finite one), log each and the total; return the total."""
        loss = self.total_loss(terms)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ utilities for detectors
    def total_loss(self, terms: dict[str, Tensor]) -> Tensor:
        """The sum of the loss terms; stops training at once, naming the step and the term, when one is not finite.

        Without this a diverged run trains every remaining epoch on NaN weights and saves them.
        """
        finite = torch.isfinite(torch.stack([value.detach().float() for value in terms.values()]))
        if bool(finite.all()):  # one device-to-host sync per step
            return sum(terms.values())
        bad = [name for name, ok in zip(terms, finite.tolist()) if not ok]
        values = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in terms.items())
        raise TrainingDiverged(
            f"Training diverged at step {self.global_step} (epoch {self.current_epoch}): "
            f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite ({values}). "
            "Nothing was saved as final.ckpt and no metrics were written. Lower the learning rate "
            "(model.init_args.lr), or train in float32 (--trainer.precision=32-true) if this is a bf16 overflow."
        )

    @torch.no_grad()
    def collect(self, dataloader: Iterable, fn: Callable[[dict[str, Any]], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Run ``fn`` on every batch in eval mode (under the trainer's precision) and gather across ranks."""
        was_training = self.training
        self.eval()
        outputs: list[dict[str, Tensor]] = []
        for batch in dataloader:
            batch = self._to_device(without_padding(batch))
            with self.trainer.precision_plugin.forward_context() if self._trainer else nullcontext():
                outputs.append({k: _as_float(v) for k, v in fn(batch).items()})
        self.train(was_training)
        return self._concat_and_gather(outputs)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    @staticmethod
    def _concat_and_gather(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        keys = outputs[0].keys() if outputs else []
        local = {k: torch.cat([o[k] for o in outputs]) for k in keys}
        return {k: gather_samples(v) for k, v in local.items()}

    # ------------------------------------------------------------------ training-time hooks
    def setup(self, stage: str) -> None:
        """Ask the data module for the training fields this detector needs (before any loader is built)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.training_fields and datamodule is not None:
            datamodule.request_training_fields(self.training_fields)

    def on_fit_start(self) -> None:
        if self.fit_only:
            raise RuntimeError(f"{type(self).__name__} has no optimiser: its training is one pass over the training "
                               "images (train.py runs it as trainer.predict; without a Trainer, fit_pass).")
        # Which weights the run uses goes into every logger's config (W&B too), not only metrics.json.
        for logger in self.loggers:
            logger.log_hyperparams({"weights_source": self.weights_source})

    def on_train_start(self) -> None:
        with phase("fitting the statistics training needs, on the training images"):
            self.fit_training_statistics(self.trainer.datamodule.statistics_dataloader())

    def on_validation_epoch_start(self) -> None:
        self._calibration_outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self.calibration_step(without_padding(batch))
        self._calibration_outputs.append({k: v.detach().float() for k, v in outputs.items()})

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._calibration_outputs:
            return
        collected = self._concat_and_gather(self._calibration_outputs)
        self._calibration_outputs = []
        datamodule = self.trainer.datamodule
        with phase("calibrating (statistics and decision threshold) on the held-out normal images"):
            self._fit_calibration_and_threshold(collected, datamodule.statistics_dataloader(),
                                                datamodule.val_dataloader())

    # ------------------------------------------------------------------ testing
    def evaluation_map(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The model's anomaly map (B×H×W, float32, the input size) and image score (B) for a batch."""
        images = batch["image"]
        output = self.model(images, **self.model_inputs(batch))
        if tuple(output.anomaly_map.shape) != (images.shape[0], 1, *images.shape[-2:]):
            raise RuntimeError(f"{type(self.model).__name__} returned a map of shape {tuple(output.anomaly_map.shape)}"
                               f" for images of shape {tuple(images.shape)}; the contract is B×1×H×W at the input size.")
        return output.anomaly_map.float()[:, 0], output.image_score.float()

    def on_test_epoch_start(self) -> None:
        if not self.is_calibrated():
            raise NotCalibrated(
                f"This {type(self).__name__} was never calibrated on held-out normal images (its map normalisation "
                "is still unfitted), so its maps and scores would be meaningless. Calibration runs after training, "
                "on the validation split; a checkpoint saved before it (last.ckpt) cannot be tested: test final.ckpt."
            )
        self.test_store.reset()
        self._display_candidates: dict[str, list[tuple[float, reporting.MapSample]]] = {}
        self._model_seconds = 0.0
        self._images_seen = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = without_padding(batch)
        images = batch["image"]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        anomaly_map, score = self.evaluation_map(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._model_seconds += time.perf_counter() - start
        self._images_seen += images.shape[0]
        self.test_store.update(
            batch["index"], score, batch["label"], anomaly_map, batch["mask"][:, 0], batch["has_mask"],
            batch.get("regions"), batch.get("region_saturation"),
        )
        self._keep_display_candidates(batch, anomaly_map, score)

    # Why a test image is shown in maps/: (role, its label, whether the highest scores are kept, else the lowest).
    DISPLAY_ROLES = (("detected", 1, True), ("missed", 1, False), ("false alarm", 0, True))

    def _keep_display_candidates(self, batch, anomaly_map: Tensor, score: Tensor) -> None:
        """Keep, per category, the best detections (highest-scoring anomalous images), the misses (lowest-scoring
        anomalous images) and the false alarms (highest-scoring normal images) for the maps/ folder."""
        cap = max(1, self.max_maps_per_category // 3)
        if self.max_maps_per_category <= 0:
            return
        for i in range(anomaly_map.shape[0]):
            label, value = int(batch["label"][i]), float(score[i])
            sample = None
            for role, role_label, highest in self.DISPLAY_ROLES:
                if label != role_label:
                    continue
                candidates = self._display_candidates.setdefault(f"{batch['category'][i]}/{role}", [])
                rank = -value if highest else value
                if len(candidates) >= cap and rank >= candidates[-1][0]:
                    continue
                sample = sample or reporting.MapSample(
                    image=batch["image"][i].float().permute(1, 2, 0).cpu().numpy(),
                    mask=batch["mask"][i, 0].float().cpu().numpy(),
                    anomaly_map=anomaly_map[i].cpu().numpy(),
                    path=batch["path"][i], category=batch["category"][i], defect_type=batch["defect_type"][i],
                    label=label, score=value,
                )
                candidates.append((rank, dataclasses.replace(sample, role=role)))
                candidates.sort(key=lambda item: item[0])
                del candidates[cap:]

    def on_test_epoch_end(self) -> None:
        results = self.test_store.compute().tensors
        datamodule = self.trainer.datamodule
        records = datamodule.records("test")
        not_finite = ~(torch.isfinite(results["scores"]) & torch.isfinite(results["maps"]).flatten(1).all(dim=1))
        if bool(not_finite.any()):
            paths = [str(records[i].image_path) for i in results["indices"][not_finite].tolist()]
            raise NonFiniteResults(
                f"{len(paths)} of {len(records)} test images have NaN or infinite anomaly maps or scores (e.g. "
                f"{', '.join(paths[:3])}); no metrics were computed from them. The training has probably diverged."
            )
        with phase(f"computing the metrics of {len(records)} test images"):
            table = compute_metrics_table(results, records, with_kinds=datamodule.is_loco)
        predicted = self.model.predicted_label(results["scores"].to(self.device)).cpu()
        score_rows = score_table(results, records, predicted)
        samples = self._gather_display_samples()
        vmin, vmax = display_range(results["maps"])
        info = {**self.run_info(), **self._speed_and_memory(), "test_images": int(results["scores"].numel()),
                "decision_threshold": threshold_report(results, records, predicted, self.model, self.threshold_fpr)}
        self.test_results = {"table": table, "scores": score_rows, "run_info": info}
        for key, value in table.flat("test").items():
            self.log(key, value, rank_zero_only=True, sync_dist=False)
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir)
            reporting.write_metrics_json(out / "metrics.json", table, info)
            reporting.write_scores_csv(out / "scores.csv", score_rows)
            reporting.write_curves_csv(out / "curves.csv", reporting.image_curves(score_rows))
            reporting.save_map_panels(out / "maps", samples, vmin, vmax)
            for logger in self.loggers:
                if isinstance(logger, WandbLogger):
                    reporting.log_results_to_wandb(logger, table, score_rows, samples, vmin, vmax)
        self.test_store.reset()

    def _gather_display_samples(self) -> list[reporting.MapSample]:
        local = [s for cands in self._display_candidates.values() for _, s in cands]
        local = gather_objects(local)
        cap = max(1, self.max_maps_per_category // 3)
        chosen: list[reporting.MapSample] = []
        for category in sorted({s.category for s in local}):
            shown: set[str] = set()  # with few anomalies, a detection would also be a "miss": show it once
            for role, _, highest in self.DISPLAY_ROLES:
                group = sorted((s for s in local if s.category == category and s.role == role and s.path not in shown),
                               key=lambda s: -s.score if highest else s.score)[:cap]
                shown.update(s.path for s in group)
                chosen += group
        return chosen

    def _speed_and_memory(self) -> dict[str, float]:
        seconds = max(self._model_seconds, 1e-9)
        info = {"model_throughput_img_per_s": self._images_seen / seconds, "device": str(self.device)}
        if self.device.type == "cuda":
            info["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        info["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return info

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["weights_source"] = self.weights_source
        checkpoint["detector_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # The precision the statistics and threshold were fitted under, so prediction can score the same way.
        checkpoint["precision"] = str(self.trainer.precision) if self._trainer is not None else "32-true"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not any(key.startswith("model.") for key in checkpoint.get("state_dict", {})):
            raise CheckpointError(
                f"This {type(self).__name__} checkpoint was written before every detector kept its networks and fitted "
                "statistics in one model (its weights are not under 'model.'), and it has no decision threshold: "
                "train the model again with this version."
            )
        self.weights_source = checkpoint.get("weights_source", self.weights_source)


def _as_float(tensor: Tensor) -> Tensor:
    """Detach; float64 stays float64 (sums for statistics), anything else becomes float32."""
    return tensor.detach().double() if tensor.dtype == torch.float64 else tensor.detach().float()


# ---------------------------------------------------------------------- result tables
METRIC_ORDER = ("image_AUROC", "image_AP", "image_F1max", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "pixel_sPRO")


def _subset_metrics(scores, labels, maps=None, masks=None, regions=None, saturation=None) -> dict[str, float]:
    """All metrics of one subset of test images (already selected)."""
    values: dict[str, float] = {}
    both_classes = labels.min() == 0 and labels.max() == 1
    image_metrics = {"image_AUROC": M.image_auroc, "image_AP": M.image_ap, "image_F1max": M.image_f1max}
    for name, fn in image_metrics.items():
        values[name] = float(fn(scores, labels)) if both_classes else float("nan")
    if maps is None:
        return values
    pixel_positive = masks.any()
    values["pixel_AUROC"] = float(M.pixel_auroc(maps, masks)) if pixel_positive else float("nan")
    values["pixel_AP"] = float(M.pixel_ap(maps, masks)) if pixel_positive else float("nan")
    values["pixel_AUPRO"] = float(M.aupro(maps, masks)) if pixel_positive else float("nan")
    if regions is not None:
        values["pixel_sPRO"] = float(M.spro(maps, regions, saturation, labels == 0)) if pixel_positive else float("nan")
    return values


def compute_metrics_table(results: dict[str, Tensor], records, with_kinds: bool) -> reporting.MetricsTable:
    """Per-category metrics (all images; and good+logical / good+structural where the data has kinds) and means."""
    categories = np.array([records[i].category for i in results["indices"].tolist()])
    kinds = np.array([records[i].anomaly_kind for i in results["indices"].tolist()])
    rows: dict[tuple[str, str], dict[str, float]] = {}
    subsets = ["all"] + (["logical", "structural"] if with_kinds else [])
    for category in sorted(set(categories.tolist())):
        in_category = categories == category
        for subset in subsets:
            if subset != "all" and not (in_category & (kinds == subset)).any():
                continue  # e.g. a texture category with no logical anomalies
            chosen = in_category & ((kinds == "good") | (kinds == subset) if subset != "all" else True)
            index = torch.from_numpy(np.flatnonzero(chosen))
            if index.numel() == 0:
                continue
            pixel_ok = bool(results["has_mask"][index].all())
            rows[(category, subset)] = _subset_metrics(
                results["scores"][index], results["labels"][index],
                results["maps"][index] if pixel_ok else None,
                results["masks"][index] if pixel_ok else None,
                results["regions"][index] if results["regions"] is not None and pixel_ok else None,
                results["saturation"][index] if results["saturation"] is not None and pixel_ok else None,
            )
    rows.update(reporting.compute_mean_rows(rows))
    return reporting.MetricsTable(rows=rows)


def score_table(results: dict[str, Tensor], records, predicted: Tensor) -> list[dict[str, Any]]:
    rows = []
    for index, score, label, guess in zip(results["indices"].tolist(), results["scores"].tolist(),
                                          results["labels"].tolist(), predicted.tolist()):
        record = records[index]
        rows.append({"path": str(record.image_path), "category": record.category, "defect_type": record.defect_type,
                     "anomaly_kind": record.anomaly_kind, "label": int(label), "score": float(score),
                     "predicted_label": int(guess)})
    return rows


def _rates(predicted: Tensor, actual: Tensor) -> dict[str, float | None]:
    """Precision, recall and false-positive rate of boolean predictions (None where undefined)."""
    predicted, actual = predicted.bool(), actual.bool()
    true_positive = int((predicted & actual).sum())
    positive, negative, flagged = int(actual.sum()), int((~actual).sum()), int(predicted.sum())
    return {"precision": true_positive / flagged if flagged else None,
            "recall": true_positive / positive if positive else None,
            "false_positive_rate": (flagged - true_positive) / negative if negative else None}


def threshold_report(results: dict[str, Tensor], records, predicted: Tensor, model: AnomalyModel,
                     target_fpr: float) -> dict[str, Any]:
    """What the decision threshold (fitted on validation normal images) gives on the test set."""
    labels = results["labels"]
    categories = np.array([records[i].category for i in results["indices"].tolist()])
    report: dict[str, Any] = {
        "fitted_on": "validation normal images", "target_false_positive_rate": target_fpr,
        "image_threshold": float(model.image_threshold), "pixel_threshold": float(model.pixel_threshold),
        "image": _rates(predicted, labels),
        "per_category": {category: _rates(predicted[torch.from_numpy(categories == category)],
                                          labels[torch.from_numpy(categories == category)])
                         for category in sorted(set(categories.tolist()))},
    }
    with_mask = results["has_mask"]
    if bool(with_mask.any()):
        maps, masks = results["maps"][with_mask], results["masks"][with_mask]
        report["pixel"] = _rates(model.predicted_mask(maps.to(model.pixel_threshold.device)).cpu().flatten(),
                                 masks.flatten())
    return report


def display_range(maps: Tensor, max_values: int = 1_000_000) -> tuple[float, float]:
    """A fixed colour scale for every displayed map: robust 1st..99.9th percentile of all test pixels."""
    values = maps.flatten()
    if values.numel() > max_values:
        generator = torch.Generator().manual_seed(0)
        values = values[torch.randint(values.numel(), (max_values,), generator=generator)]
    low, high = torch.quantile(values.float(), torch.tensor([0.01, 0.999])).tolist()
    return float(low), float(high if high > low else low + 1e-6)
