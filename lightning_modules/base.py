"""The training and evaluation path every detector shares.

A detector is a pure-torch ``AnomalyModel`` (``networks/``: it scores images alone, fitted
statistics included) wrapped by a thin subclass of ``AnomalyDetector`` that supplies the loss
(``training_step``, ``build_optimizers``) and explicit fitting hooks: ``fit_training_statistics``
(on the training images, before training) and ``calibration_step`` / ``fit_calibration`` (on
held-out normal images, after training); a detector without an optimiser declares ``fit_only`` and
supplies ``fit_step`` / ``finish_fit`` instead. This class does the rest, identically for every
detector: the decision threshold (fitted on the same held-out normal images), gathering across
processes, the checks that stop a diverged run, and the test hooks, which hand each batch's maps and
scores to ``lightning_modules.evaluation.TestEvaluation`` (metrics, threshold report, saved maps,
output files). Every hook also runs without a Trainer (``calibrate``, ``fit_pass``), which the
benchmark and the contract tests use.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_modules.distributed import gather_samples
from lightning_modules.evaluation import NonFiniteResults, TestEvaluation
from lightning_modules.progress import phase
from lightning_modules.resume import CheckpointError
from networks.anomaly_model import AnomalyModel

# A detector's image_size when built in Python without one; the CLI always passes data.image_size.
DEFAULT_IMAGE_SIZE = 256


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite: training stops at once and writes no final checkpoint or metrics."""

    diverged = True  # read by the checkpoint callback: a diverged state is not worth resuming


class NotCalibrated(RuntimeError):
    """Testing a model whose post-training calibration (map quantiles, score statistics) was never fitted."""


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
        self.evaluation = TestEvaluation(threshold_fpr, max_maps_per_category)
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
        raise NotImplementedError(f"{type(self).__name__} defines no build_optimizers: "
                                  "a fit-only detector has no optimiser")

    def fit_step(self, batch: dict[str, Any]) -> None:
        """Fit-only detectors: take what the fitted state needs from one batch of training images (no gradients)."""
        raise NotImplementedError(f"{type(self).__name__} is gradient-trained: it has no fit_step (see fit_only)")

    def finish_fit(self) -> None:
        """Fit-only detectors: build the fitted state from everything ``fit_step`` kept; runs on every process,
        so it may gather across them (``lightning_modules.distributed``)."""
        raise NotImplementedError(f"{type(self).__name__} is gradient-trained: it has no finish_fit (see fit_only)")

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
            raise ValueError(f"{type(self).__name__} has no category {unknown}: its fitted state knows {names}")
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
        self.evaluation.start(self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch = without_padding(batch)
        anomaly_map, score = self.evaluation.timed(self.evaluation_map, batch)
        self.evaluation.update(batch, anomaly_map, score)

    def on_test_epoch_end(self) -> None:
        output_dir = Path(self.trainer.default_root_dir) if self.trainer.is_global_zero else None
        self.test_results = self.evaluation.finish(self.model, self.run_info(), output_dir, self.loggers)
        for key, value in self.test_results["table"].flat("test").items():
            self.log(key, value, rank_zero_only=True, sync_dist=False)

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
