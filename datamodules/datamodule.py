"""The LightningDataModule: scan + validate a dataset, split it, and serve DDP-safe loaders."""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules import layouts
from datamodules.dataset import AnomalyDataset
from datamodules.records import SampleRecord
from datamodules.synthesis import build_synthesis
from datamodules.validate import DatasetError, validate_records

log = logging.getLogger(__name__)

LOCO_LAYOUTS = ("mvtec_loco", "embedded")
# Per-item fields a detector may ask the training loader for (AnomalyDetector.training_fields).
TRAINING_FIELDS = ("prompt_image",)


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2*world, ... with no padding, so that under DDP every
    evaluation image is seen exactly once (torch's DistributedSampler repeats images to even out
    the shards, which would bias gathered metrics).

    A process whose shard would be empty (fewer images than processes) gets one padding index
    instead, `length + rank % length`: `AnomalyDataset` serves it as a copy flagged `padding`, which
    the evaluation drops. Every process then takes part in every collective call (Lightning
    refuses an empty loader on one process, and a process with no batch would leave the others
    waiting at the gather).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.indices = range(rank, length, world_size)
        if not self.indices and length > 0:
            self.indices = [length + rank % length]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def split_validation(records: list[SampleRecord], fraction: float, seed: int) -> tuple[list, list]:
    """Move a seeded `fraction` of each category's train images to the validation split.

    Per category, seeded by (seed, crc32(category)) so it is the same in every process and does
    not change when other categories are added. At least one image is held out and one kept
    whenever a category has two or more train images and `fraction` > 0."""
    train, validation = [], []
    for category in dict.fromkeys(r.category for r in records):
        own = [r for r in records if r.category == category]
        count = len(own)
        held_out = round(fraction * count)
        if fraction > 0 and count >= 2:
            held_out = min(max(held_out, 1), count - 1)
        elif count < 2:
            held_out = 0
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        chosen = set(rng.permutation(count)[:held_out].tolist())
        for position, record in enumerate(own):
            if position in chosen:
                validation.append(dataclasses.replace(record, split="validation"))
            else:
                train.append(record)
    return train, validation


class AnomalyDataModule(L.LightningDataModule):
    """Train / validation / test loaders for one or more categories of one dataset layout.

    Args:
        layout: one of mvtec_ad, mvtec_loco, visa, btad, mpdd, folder, embedded.
        root: dataset folder; `embedded` defaults to data/embedded (generated on first use).
        categories: "all", a category name, a comma-separated string or a list; several
            categories train one unified model.
        image_size: side S of the square images the model sees.
        train_batch_size, eval_batch_size: batch size per process.
        num_workers: DataLoader worker processes per loader.
        validation_fraction: share of each category's train images held out as validation,
            for layouts without a validation folder (LOCO/embedded use `validation/good`).
        split_seed: seed of that hold-out and of the DDP train shuffling.
        synthesis: none | cutpaste | cutpaste_scar | cutpaste_3way | perlin; adds
            `synthetic_image`/`synthetic_mask` to training items.
        texture_dir: texture images for `perlin` (e.g. DTD); procedural textures when null.
        embedded_seed: seed of the generated embedded dataset.
        check_pixels: validate by decoding every image fully (catches truncated and corrupt
            files) rather than by reading headers only; see `validate.py` for the cost.
        strict: suspicious ground truth (all-zero masks on defect images, masks without a 0
            background, JPEG masks, unmatched ground-truth folders) is an error, not a warning.

    The scan and validation run in `setup()`, which Lightning calls before any training step.
    """

    def __init__(
        self,
        layout: str = "embedded",
        root: str | None = None,
        categories: str | list[str] = "all",
        image_size: int = 256,
        train_batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        validation_fraction: float = 0.15,
        split_seed: int = 42,
        synthesis: str | None = None,
        texture_dir: str | None = None,
        embedded_seed: int = 0,
        check_pixels: bool = True,
        strict: bool = False,
    ):
        super().__init__()
        if layout not in layouts.LAYOUTS:
            raise DatasetError(
                f"unknown dataset layout '{layout}'; choose one of: {', '.join(layouts.LAYOUTS)}"
            )
        if root is None and layout != "embedded":
            raise DatasetError(f"layout '{layout}' needs a dataset root: set data.root (init_args.root)")
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.save_hyperparameters()
        self.layout = layout
        self.root = root
        self.categories = categories
        self.image_size = image_size
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.validation_fraction = validation_fraction
        self.split_seed = split_seed
        self.synthesis = synthesis
        self.texture_dir = texture_dir
        self.embedded_seed = embedded_seed
        self.check_pixels = check_pixels
        self.strict = strict
        # Built here so a bad synthesis name or texture_dir fails before anything else runs.
        self.synthesis_fn = build_synthesis(synthesis, texture_dir)
        self.root_path = None
        self.defects_configs: dict[str, dict[int, tuple[float, bool]]] | None = None
        self._records: dict[str, list[SampleRecord]] | None = None
        self.training_fields: tuple[str, ...] = ()

    def request_training_fields(self, fields: tuple[str, ...]) -> None:
        """What the detector needs in each training item besides image and synthesis (see TRAINING_FIELDS)."""
        unknown = sorted(set(fields) - set(TRAINING_FIELDS))
        if unknown:
            raise ValueError(f"the data module cannot serve training fields {unknown}; it serves {list(TRAINING_FIELDS)}")
        self.training_fields = tuple(fields)

    # ------------------------------------------------------------------ scanning

    @property
    def is_loco(self) -> bool:
        """The layout has an official validation folder and per-defect saturation configs."""
        return self.layout in LOCO_LAYOUTS

    def prepare_data(self) -> None:
        """Local rank 0 only: write the embedded dataset if it is not there yet."""
        if self.layout == "embedded":
            layouts.resolve_root(self.layout, self.root, self.embedded_seed)

    def setup(self, stage: str | None = None) -> None:
        if self._records is not None:
            return
        self.root_path = layouts.resolve_root(self.layout, self.root, self.embedded_seed)
        names = layouts.select_categories(self.layout, self.root_path, self.categories)
        records = layouts.scan_resolved(self.layout, self.root_path, names)
        validate_records(records, check_pixels=self.check_pixels, categories=names, strict=self.strict,
                         doubts=layouts.ground_truth_doubts(self.layout, self.root_path, names))

        by_split = {
            split: [r for r in records if r.split == split] for split in ("train", "validation", "test")
        }
        if self.is_loco:
            without_folder = sorted(
                {r.category for r in by_split["train"]} - {r.category for r in by_split["validation"]}
            )
            if without_folder:
                log.warning(
                    "no validation/good images for %s: holding out %.0f%% of train instead",
                    without_folder,
                    100 * self.validation_fraction,
                )
                moved_train, moved_validation = split_validation(
                    [r for r in by_split["train"] if r.category in without_folder],
                    self.validation_fraction,
                    self.split_seed,
                )
                by_split["train"] = [
                    r for r in by_split["train"] if r.category not in without_folder
                ] + moved_train
                by_split["validation"] += moved_validation
            self.defects_configs = {name: layouts.load_defects_config(self.root_path, name) for name in names}
        else:
            by_split["train"], by_split["validation"] = split_validation(
                by_split["train"], self.validation_fraction, self.split_seed
            )
        self._records = by_split
        self.categories_found_ = names
        counts = ", ".join(f"{split} {len(items)}" for split, items in by_split.items())
        log.info("%s at %s: %d categories (%s)", self.layout, self.root_path, len(names), counts)

    def records(self, split: str) -> list[SampleRecord]:
        """The records of "train", "validation" or "test" (scans on first use)."""
        self.setup()
        if split not in self._records:
            raise KeyError(f"split must be one of {list(self._records)}, got '{split}'")
        return list(self._records[split])

    @property
    def categories_found(self) -> list[str]:
        """The category names in use, in scan order."""
        self.setup()
        return list(self.categories_found_)

    # ------------------------------------------------------------------ loaders

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, dataset: AnomalyDataset, batch_size: int, sampler: Sampler, drop_last: bool = False):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loader(self, dataset: AnomalyDataset) -> DataLoader:
        rank, world = self._rank_and_world()
        return self._loader(dataset, self.eval_batch_size, ShardSampler(len(dataset), rank, world))

    def train_dataloader(self) -> DataLoader:
        dataset = AnomalyDataset(
            self.records("train"), self.image_size, train=True, synthesis=self.synthesis_fn,
            prompts="prompt_image" in self.training_fields,
        )
        rank, world = self._rank_and_world()
        if world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.split_seed
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset)
        drop_last = len(sampler) >= self.train_batch_size
        return self._loader(dataset, self.train_batch_size, sampler, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(AnomalyDataset(self.records("validation"), self.image_size))

    def test_dataloader(self) -> DataLoader:
        configs = self.defects_configs if self.is_loco else None
        return self._eval_loader(
            AnomalyDataset(self.records("test"), self.image_size, defects_configs=configs)
        )

    def statistics_dataloader(self) -> DataLoader:
        """Training images in a fixed order, without augmentation or synthesis (for fitted statistics)."""
        return self._eval_loader(AnomalyDataset(self.records("train"), self.image_size))

    def predict_dataloader(self) -> DataLoader:
        """What ``trainer.predict`` runs on: a fit-only detector's one fitting pass over the training images (the
        statistics loader, built once the processes exist, so each takes its own shard)."""
        return self.statistics_dataloader()
