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
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from datamodules.dataset import read_image
from datamodules.layouts import list_images
from lightning_modules.base import DEFAULT_IMAGE_SIZE, AnomalyDetector, DetectorOutput
from networks.efficientad import EfficientADAutoencoder, PatchDescriptionNetwork, load_teacher_state_dict

logger = logging.getLogger(__name__)

TEACHER_CHANNELS = 384
MODEL_SIZES = ("small", "medium")
# One of these, with a factor drawn from U(0.8, 1.2), per image of the autoencoder branch (spec §3.3).
COLOUR_ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


# ---------------------------------------------------------------------------------------- helpers
def exact_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of all entries, with torch.quantile's linear interpolation but no size limit.

    torch.quantile refuses inputs above 2**24 elements (a batch of 16 student maps at 256 px has
    19M); the reference code subsamples there. kthvalue selects the two order statistics exactly.
    """
    flat = values.detach().flatten().float()
    position = q * (flat.numel() - 1)
    lower = math.floor(position)
    low = torch.kthvalue(flat, lower + 1).values
    fraction = position - lower
    if fraction == 0 or lower + 1 >= flat.numel():
        return low
    high = torch.kthvalue(flat, lower + 2).values
    return torch.lerp(low, high, fraction)


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


def normalize_map(anomaly_map: Tensor, q_low: Tensor, q_high: Tensor) -> Tensor:
    """0.1 · (M − q_low) / (q_high − q_low): q_low → 0, q_high → 0.1 (spec §5)."""
    return 0.1 * (anomaly_map - q_low) / (q_high - q_low)


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


def build_teacher(model_size: str, teacher_weights: str | None, teacher_pretrained: bool | str
                  ) -> tuple[PatchDescriptionNetwork, str]:
    """The unpadded teacher PDN and where its weights came from (the DESIGN.md weight contract)."""
    teacher = PatchDescriptionNetwork(model_size, TEACHER_CHANNELS, padding=False)
    if not (isinstance(teacher_pretrained, bool) or teacher_pretrained == "auto"):
        raise ValueError(f"teacher_pretrained must be true, false or 'auto', got {teacher_pretrained!r}")
    how_to_get = ("Distil one with `python distill.py --images DIR --size " + model_size + " --out FILE`, or use a "
                  "published teacher_" + model_size + ".pth (nelson1425/EfficientAD or anomalib layouts both load).")
    if teacher_pretrained is False:
        if teacher_weights is not None:
            raise ValueError(f"teacher_pretrained=false asks for a random teacher but teacher_weights="
                             f"{teacher_weights} was given; set teacher_pretrained to true or drop teacher_weights.")
        return teacher, "random teacher (teacher_pretrained=false)"
    if teacher_weights is not None:
        path = Path(teacher_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Teacher weights file not found: {path}. {how_to_get}")
        layout = load_teacher_state_dict(teacher, path)
        return teacher, f"file:{path.resolve()} ({layout} keys)"
    if teacher_pretrained is True:
        raise ValueError(f"EfficientAD needs a distilled teacher: teacher_pretrained=true but teacher_weights is "
                         f"null. {how_to_get} Or set teacher_pretrained: false for a weights-free random teacher.")
    message = ("EfficientAD runs with a RANDOM teacher (teacher_pretrained='auto' and no teacher_weights): "
               "results are not comparable to the paper. " + how_to_get)
    warnings.warn(message, stacklevel=3)
    logger.warning(message)
    return teacher, "random teacher (fallback: teacher_pretrained='auto', no teacher_weights)"


# ---------------------------------------------------------------------------------------- detector
class EfficientAD(AnomalyDetector):
    """EfficientAD-S/M on the shared evaluation path.

    ``teacher_weights`` / ``teacher_pretrained``: the distilled teacher PDN (a file from distill.py
    or a published one); ``teacher_pretrained: false`` runs weights-free with a random teacher.
    ``penalty_dir``: natural images for the ImageNet penalty term; null drops the term.
    ``require_penalty``: refuse to start without ``penalty_dir`` (the paper configs set it: the
    official code always trains with the penalty, so dropping it must be an explicit choice).
    """

    checkpoint_init_overrides: ClassVar[dict[str, Any]] = {
        "teacher_pretrained": False, "teacher_weights": None, "penalty_dir": None, "require_penalty": False,
    }

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
        max_maps_per_category: int = 6,
    ) -> None:
        super().__init__(max_maps_per_category=max_maps_per_category)
        image_size = image_size or DEFAULT_IMAGE_SIZE  # the CLI passes data.image_size
        if model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")
        if require_penalty and penalty_dir is None:
            raise ValueError(
                "These are the paper settings, which train with the ImageNet penalty term (spec §3.2), but "
                "model.init_args.penalty_dir is null. Point it at a folder of natural images (ImageNet train; "
                "Imagenette works, as in anomalib): --model.init_args.penalty_dir=/path/to/imagenet/train. To train "
                "without the penalty on purpose (an ablation, recorded as 'penalty: off'), also pass "
                "--model.init_args.require_penalty=false."
            )
        self.save_hyperparameters()
        self.teacher, self.weights_source = build_teacher(model_size, teacher_weights, teacher_pretrained)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student = PatchDescriptionNetwork(model_size, 2 * TEACHER_CHANNELS, padding=False)
        self.autoencoder = EfficientADAutoencoder(TEACHER_CHANNELS, image_size, padding=False)
        self.penalty_images = PenaltyImages(penalty_dir, image_size) if penalty_dir is not None else None
        self.penalty_source = (f"on: {Path(penalty_dir).expanduser().resolve()} ({len(self.penalty_images)} images)"
                               if self.penalty_images is not None else "off")
        self._penalty_batches: Iterator[Tensor] | None = None
        # Teacher channel statistics (spec §2.3); std 0 = not fitted yet.
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        # (q_low, q_high) of the student–teacher map, then of the autoencoder map; zeros = not fitted.
        self.register_buffer("map_quantiles", torch.zeros(4))

    def train(self, mode: bool = True) -> EfficientAD:
        """The teacher stays in eval mode: it is frozen."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------ statistics status
    @property
    def teacher_statistics_fitted(self) -> bool:
        return bool((self.teacher_std > 0).all())

    @property
    def map_quantiles_fitted(self) -> bool:
        return bool(self.map_quantiles.abs().sum() > 0)

    def is_calibrated(self) -> bool:
        return self.map_quantiles_fitted

    # ------------------------------------------------------------------ networks
    def _check_size(self, images: Tensor) -> None:
        expected = self.hparams.image_size
        if tuple(images.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"EfficientAD was built for {expected}×{expected} images (the autoencoder's output size "
                f"depends on it) but got {tuple(images.shape[-2:])}; set data.image_size (the model takes it from there)."
            )

    def normalized_teacher(self, images: Tensor) -> Tensor:
        """(T − μ)/σ in float32; the raw teacher output while the statistics are not fitted yet."""
        with torch.no_grad():
            teacher = self.teacher(images).float()
        if not self.teacher_statistics_fitted:
            return teacher
        return (teacher - self.teacher_mean) / self.teacher_std

    def fit_pre_training_statistics(self, dataloader) -> None:
        """Teacher channel mean/std over every training image and position: float64 sums of T and T² ([A])."""
        if self.teacher_statistics_fitted:
            return  # restored from a checkpoint
        def channel_sums(batch):
            teacher = self.teacher(batch["image"]).double()
            return {"sum": teacher.sum(dim=(2, 3)), "sum_sq": (teacher**2).sum(dim=(2, 3)),
                    "count": torch.full((teacher.shape[0],), teacher.shape[2] * teacher.shape[3],
                                        dtype=torch.float64, device=teacher.device)}
        sums = self.collect(dataloader, channel_sums)
        count = sums["count"].sum()
        mean = sums["sum"].sum(0) / count
        std = (sums["sum_sq"].sum(0) / count - mean**2).clamp_min(0).sqrt()
        self.teacher_mean.copy_(mean.float().view_as(self.teacher_mean))
        self.teacher_std.copy_(std.float().clamp_min(torch.finfo(torch.float32).tiny).view_as(self.teacher_std))

    # ------------------------------------------------------------------ losses
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

    def loss_terms(self, images: Tensor, penalty_images: Tensor | None = None) -> dict[str, Tensor]:
        """L_hard, L_penalty (when penalty images are given), L_AE and L_STAE (spec §3), in float32."""
        self._check_size(images)
        hp, batch = self.hparams, images.shape[0]
        augmented = colour_augmentation(images) if hp.ae_augmentation else images
        teacher = self.normalized_teacher(torch.cat([images, augmented]))
        student_inputs = [images, augmented] + ([penalty_images] if penalty_images is not None else [])
        student = self.student(torch.cat(student_inputs)).float()
        autoencoder = self.autoencoder(augmented).float()

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
        terms = self.loss_terms(images, penalty)
        loss = self.total_loss(terms)
        size = images.shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def on_train_end(self) -> None:
        self._penalty_batches = None  # dropping the iterator shuts the penalty loader's workers down

    def configure_optimizers(self):
        """Adam over student + autoencoder; lr × 0.1 at ``lr_decay_fraction`` of the steps (spec §4)."""
        parameters = list(self.student.parameters()) + list(self.autoencoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError("EfficientAD's learning-rate drop needs a finite run: set trainer.max_steps "
                             "(the paper: 70000) or trainer.max_epochs.")
        step_size = max(1, int(self.hparams.lr_decay_fraction * total_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ maps
    def network_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """Raw student–teacher and autoencoder maps (B×1×S×S, upsampled, float32) plus the feature maps."""
        self._check_size(images)
        teacher = self.normalized_teacher(images)
        student = self.student(images).float()
        autoencoder = self.autoencoder(images).float()
        map_st = ((teacher - student[:, :TEACHER_CHANNELS]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((autoencoder - student[:, TEACHER_CHANNELS:]) ** 2).mean(dim=1, keepdim=True)
        maps = F.interpolate(torch.cat([map_st, map_ae], dim=1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        return {"map_st": maps[:, :1], "map_ae": maps[:, 1:], "teacher": teacher, "student": student}

    def combined_map(self, map_st: Tensor, map_ae: Tensor) -> Tensor:
        """0.5 · normalised ST map + 0.5 · normalised AE map (raw maps while quantiles are not fitted)."""
        if self.map_quantiles_fitted:
            q = self.map_quantiles
            map_st, map_ae = normalize_map(map_st, q[0], q[1]), normalize_map(map_ae, q[2], q[3])
        return 0.5 * map_st + 0.5 * map_ae

    def predict(self, images: Tensor) -> DetectorOutput:
        outputs = self.network_outputs(images)
        anomaly_map = self.combined_map(outputs["map_st"], outputs["map_ae"])
        return DetectorOutput(anomaly_map=anomaly_map, image_score=anomaly_map.amax(dim=(-3, -2, -1)))

    # ------------------------------------------------------------------ calibration
    def calibration_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = self.network_outputs(batch["image"][batch["label"] == 0])
        return {"map_st": outputs["map_st"].flatten(1), "map_ae": outputs["map_ae"].flatten(1)}

    def fit_calibration(self, collected: dict[str, Tensor]) -> None:
        """Quantiles of the validation images' upsampled maps, pooled over all pixels (spec §5 [P])."""
        hp = self.hparams
        fitted = [exact_quantile(collected[name], level).to(self.device)
                  for name in ("map_st", "map_ae") for level in (hp.q_low, hp.q_high)]
        self.map_quantiles.copy_(torch.stack(fitted))

    def run_info(self) -> dict[str, Any]:
        q = self.map_quantiles.tolist()
        return {**super().run_info(), "model_size": self.hparams.model_size, "penalty": self.penalty_source,
                "teacher_statistics_fitted": self.teacher_statistics_fitted,
                "map_quantiles_fitted": self.map_quantiles_fitted,
                "map_quantiles": {"student_teacher": q[:2], "autoencoder": q[2:]}}

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["penalty_source"] = self.penalty_source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.penalty_source = checkpoint.get("penalty_source", self.penalty_source)
