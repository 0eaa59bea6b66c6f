"""EfficientAD (Batzner et al., WACV 2024): student–teacher + autoencoder on patch description networks.

Spec: ``../shared/specs/puad_efficientad.md`` (§2.3 teacher statistics, §3 losses, §4 recipe, §5
inference). Choices among the reference implementations, all documented there:
- teacher channel statistics: running float64 sums of T and T² over the training images,
  population std ([A]);
- maps: no 4 px padding; each 56×56 map bilinearly upsampled to the image size, then quantile-
  normalised with quantiles of the validation images' upsampled maps ([P], the PUAD code);
- the ImageNet penalty is optional (``penalty_dir``; [N] drops it when no ImageNet is given).
Everything the evaluation needs (teacher statistics, map quantiles) is a buffer in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.dataset import read_image
from datamodules.layouts import list_images
from lightning_modules.base import DEFAULT_IMAGE_SIZE, AnomalyDetector
from networks.backbones import RESTORED_FROM_CHECKPOINT, weights_are_restored_later
from networks.efficientad import (
    TEACHER_CHANNELS,
    EfficientADModel,
    PatchDescriptionNetwork,
    load_teacher_state_dict,
)
from networks.statistics import channel_moments, channel_sums, exact_quantile

logger = logging.getLogger(__name__)

MODEL_SIZES = ("small", "medium")
# One of these, with a factor drawn from U(0.8, 1.2), per image of the autoencoder branch (spec §3.3).
COLOUR_ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


# ---------------------------------------------------------------------------------------- helpers
def hard_feature_loss(squared_differences: Tensor, quantile: float) -> Tensor:
    """Mean of the entries at or above their `quantile` (spec §3.1: the hardest ~0.1 % of features)."""
    values = squared_differences.float()
    threshold = exact_quantile(values, quantile)
    return values[values >= threshold].mean()


def colour_augmentation(images: Tensor) -> Tensor:
    """Per image: brightness, contrast or saturation (uniform choice) with factor ~ U(0.8, 1.2) (spec §3.3)."""
    augmented = []
    for image in images:
        adjust = COLOUR_ADJUSTMENTS[int(torch.randint(len(COLOUR_ADJUSTMENTS), ()))]
        factor = float(torch.empty(()).uniform_(0.8, 1.2))
        augmented.append(adjust(image, factor))
    return torch.stack(augmented)


class PenaltyImages(Dataset):
    """Generic natural images for the penalty term: resize to 2S, grayscale with p 0.3, centre crop S (spec §3.2).

    Any folder of photographs works (ImageNet train, Imagenette); it is searched recursively.
    """

    def __init__(self, folder: str | Path, image_size: int) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"penalty_dir {self.folder} does not exist. Point it at a folder of natural images "
                "(e.g. ImageNet train or Imagenette), or set penalty_dir: null to train without the penalty."
            )
        self.paths = list_images(self.folder, recursive=True)
        if not self.paths:
            raise FileNotFoundError(
                f"penalty_dir {self.folder} holds no images (.png/.jpg/.jpeg/.bmp/.tif, searched recursively); "
                "set penalty_dir: null to train without the penalty."
            )
        self.transform = v2.Compose([
            v2.Resize((2 * image_size, 2 * image_size), antialias=True),
            v2.RandomGrayscale(p=0.3),
            v2.CenterCrop(image_size),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        image = torch.from_numpy(read_image(self.paths[index]).transpose(2, 0, 1).copy())
        return self.transform(image)


def load_teacher(teacher: PatchDescriptionNetwork, teacher_weights: str | None, teacher_pretrained: bool | str
                 ) -> str:
    """Load the teacher PDN's weights; return where they came from (the DESIGN.md weight contract)."""
    model_size = teacher.size
    if not (isinstance(teacher_pretrained, bool) or teacher_pretrained == "auto"):
        raise ValueError(f"teacher_pretrained must be true, false or 'auto', got {teacher_pretrained!r}")
    if weights_are_restored_later():
        return RESTORED_FROM_CHECKPOINT
    how_to_get = ("Distil one with `python distill.py --images DIR --size " + model_size + " --out FILE`, or use a "
                  "published teacher_" + model_size + ".pth (nelson1425/EfficientAD or anomalib layouts both load).")
    if teacher_pretrained is False:
        if teacher_weights is not None:
            raise ValueError(f"teacher_pretrained=false asks for a random teacher but teacher_weights="
                             f"{teacher_weights} was given; set teacher_pretrained to true or drop teacher_weights.")
        return "random teacher (teacher_pretrained=false)"
    if teacher_weights is not None:
        path = Path(teacher_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Teacher weights file not found: {path}. {how_to_get}")
        layout = load_teacher_state_dict(teacher, path)
        return f"file:{path.resolve()} ({layout} keys)"
    if teacher_pretrained is True:
        raise ValueError(f"EfficientAD needs a distilled teacher: teacher_pretrained=true but teacher_weights is "
                         f"null. {how_to_get} Or set teacher_pretrained: false for a weights-free random teacher.")
    message = ("EfficientAD runs with a RANDOM teacher (teacher_pretrained='auto' and no teacher_weights): "
               "results are not comparable to the paper. " + how_to_get)
    warnings.warn(message, stacklevel=3)
    logger.warning(message)
    return "random teacher (fallback: teacher_pretrained='auto', no teacher_weights)"


# ---------------------------------------------------------------------------------------- detector
class EfficientAD(AnomalyDetector):
    """EfficientAD-S/M: a student distils a frozen teacher PDN, an autoencoder learns the global layout.

    Args:
        model_size: "small" (PDN-S) or "medium" (PDN-M).
        teacher_weights: the distilled teacher PDN file (from distill.py, nelson1425 or anomalib layouts).
        teacher_pretrained: true (teacher_weights required), "auto" (random teacher with a warning if none)
            or false (a weights-free random teacher).
        penalty_dir: a folder of natural images (ImageNet train, Imagenette) for the penalty term; null drops it.
        require_penalty: refuse to start without penalty_dir (the paper configs set it: dropping the term
            must be an explicit choice).
        penalty_num_workers: data-loader workers for the penalty images.
        image_size: taken from data.image_size; leave unset.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        lr_decay_fraction: the learning rate drops ×0.1 after this fraction of the steps.
        hard_quantile: the hard-feature loss keeps the squared differences above this quantile.
        q_low: lower map quantile of the normalisation, fitted on validation normal images.
        q_high: upper map quantile of the normalisation.
        ae_augmentation: colour-augment the autoencoder branch's images (spec §3.3).
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
        threshold_fpr: float = 0.05,
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(threshold_fpr=threshold_fpr, max_maps_per_category=max_maps_per_category)
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        if model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")
        if require_penalty and penalty_dir is None and not weights_are_restored_later():  # a training requirement
            raise ValueError(
                "These are the paper settings, which train with the ImageNet penalty term (spec §3.2), but "
                "model.init_args.penalty_dir is null. Point it at a folder of natural images (ImageNet train; "
                "Imagenette works, as in anomalib): --model.init_args.penalty_dir=/path/to/imagenet/train. To train "
                "without the penalty on purpose (an ablation, recorded as 'penalty: off'), also pass "
                "--model.init_args.require_penalty=false."
            )
        self.save_hyperparameters()
        self.model = self.build_model(model_size, image_size)
        self.weights_source = load_teacher(self.model.teacher, teacher_weights, teacher_pretrained)
        # A bad penalty folder fails here, before training; rebuilding a checkpoint (evaluation, prediction,
        # export, the benchmark) never opens it: only training needs the images.
        self.penalty_images: PenaltyImages | None = None
        self.penalty_source = f"on: {Path(penalty_dir).expanduser().resolve()}" if penalty_dir is not None else "off"
        if penalty_dir is not None and not weights_are_restored_later():
            self._open_penalty_images()
        self._penalty_batches: Iterator[Tensor] | None = None

    def build_model(self, model_size: str, image_size: int) -> EfficientADModel:
        return EfficientADModel(model_size, image_size)

    # ------------------------------------------------------------------ statistics on training images
    def fit_training_statistics(self, training_batches) -> None:
        """Teacher channel mean/std over every training image and position: float64 sums of T and T² ([A])."""
        if self.model.teacher_statistics_fitted:
            return  # restored from a checkpoint
        sums = self.collect(training_batches, lambda batch: channel_sums(self.model.teacher(batch["image"])))
        self.model.set_teacher_statistics(*channel_moments(sums))

    # ------------------------------------------------------------------ losses
    def _open_penalty_images(self) -> None:
        self.penalty_images = PenaltyImages(self.hparams.penalty_dir, self.model.image_size)
        self.penalty_source = f"on: {self.penalty_images.folder.resolve()} ({len(self.penalty_images)} images)"

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.penalty_dir is not None and self.penalty_images is None:
            self._open_penalty_images()

    def next_penalty_batch(self, batch_size: int) -> Tensor:
        """The next batch of penalty images (infinite, sampled with replacement, seeded by the run's seed)."""
        if self.penalty_images is None:
            raise RuntimeError("no penalty_dir was given")
        if self._penalty_batches is None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())) + rank)
            sampler = RandomSampler(self.penalty_images, replacement=True, num_samples=2**62, generator=generator)
            workers = self.hparams.penalty_num_workers
            loader = DataLoader(self.penalty_images, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")
            self._penalty_batches = iter(loader)
        return next(self._penalty_batches).to(self.device, non_blocking=True)

    def teacher_targets(self, images: Tensor) -> Tensor:
        """Normalised teacher output; the raw output while the statistics are not fitted yet (unit tests)."""
        if not self.model.teacher_statistics_fitted:
            with torch.no_grad():
                return self.model.teacher(images).float()
        return self.model.normalized_teacher(images)

    def loss_terms(self, images: Tensor, penalty_images: Tensor | None = None) -> dict[str, Tensor]:
        """L_hard, L_penalty (when penalty images are given), L_AE and L_STAE (spec §3), in float32."""
        model = self.model
        model.check_size(images)
        hp, batch = self.hparams, images.shape[0]
        augmented = colour_augmentation(images) if hp.ae_augmentation else images
        teacher = self.teacher_targets(torch.cat([images, augmented]))
        student_inputs = [images, augmented] + ([penalty_images] if penalty_images is not None else [])
        student = model.student(torch.cat(student_inputs)).float()
        autoencoder = model.autoencoder(augmented).float()

        student_plain, student_augmented = student[:batch], student[batch : 2 * batch]
        terms = {"loss_hard": hard_feature_loss((teacher[:batch] - student_plain[:, :TEACHER_CHANNELS]) ** 2,
                                                hp.hard_quantile)}
        if penalty_images is not None:
            terms["loss_penalty"] = (student[2 * batch :, :TEACHER_CHANNELS] ** 2).mean()
        terms["loss_ae"] = ((teacher[batch:] - autoencoder) ** 2).mean()
        terms["loss_stae"] = ((autoencoder - student_augmented[:, TEACHER_CHANNELS:]) ** 2).mean()
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        penalty = self.next_penalty_batch(images.shape[0]) if self.penalty_images is not None else None
        return self.log_losses(self.loss_terms(images, penalty), batch_size=images.shape[0])

    def on_train_end(self) -> None:
        self._penalty_batches = None  # dropping the iterator shuts the penalty loader's workers down

    def build_optimizers(self, total_steps: int):
        """Adam over student + autoencoder; lr × 0.1 at ``lr_decay_fraction`` of the steps (spec §4)."""
        parameters = list(self.model.student.parameters()) + list(self.model.autoencoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not math.isfinite(total_steps):
            raise ValueError("EfficientAD's learning-rate drop needs a finite run: set trainer.max_steps "
                             "(the paper: 70000) or trainer.max_epochs.")
        step_size = max(1, int(self.hparams.lr_decay_fraction * total_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ calibration on held-out normal images
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = self.model.raw_maps(batch["image"][batch["label"] == 0])
        return {"map_st": outputs["map_st"].flatten(1), "map_ae": outputs["map_ae"].flatten(1)}

    def fit_calibration(self, collected: dict[str, Tensor], training_batches) -> None:
        self.model.set_map_quantiles(collected["map_st"], collected["map_ae"], self.hparams.q_low, self.hparams.q_high)

    def run_info(self) -> dict[str, Any]:
        q = self.model.map_quantiles.tolist()
        return {**super().run_info(), "model_size": self.hparams.model_size, "penalty": self.penalty_source,
                "teacher_statistics_fitted": self.model.teacher_statistics_fitted,
                "map_quantiles_fitted": self.model.map_quantiles_fitted,
                "map_quantiles": {"student_teacher": q[:2], "autoencoder": q[2:]}}

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["penalty_source"] = self.penalty_source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.penalty_source = checkpoint.get("penalty_source", self.penalty_source)
