"""The torch Dataset every detector reads: RGB images in [0, 1], binary masks, LOCO regions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from datamodules.records import SampleRecord
from datamodules.validate import DatasetError

Synthesis = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
DefectsConfig = Mapping[int, tuple[float, bool]]
EVAL_SYNTHESIS_SEED = 0


def read_image(path: str | Path) -> np.ndarray:
    """An image file as H x W x 3 float32 RGB in [0, 1], whatever its bit depth or channel count.

    OpenCV reads 8/16-bit and float files (Pillow drops 16-bit colour to 8 bit); it returns BGR(A),
    so the channels are reordered here. Grey images are repeated to three channels; alpha is dropped.
    """
    data = np.fromfile(str(path), dtype=np.uint8)  # imdecode: also works for non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DatasetError(f"{path}: cannot be read as an image")
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        image = image.astype(np.float32) / 65535.0
    else:
        image = np.clip(image.astype(np.float32), 0.0, 1.0)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x C float32 → height x width x C: bilinear, antialiased when it shrinks the image.

    This is PIL's resize, which the official detector codes use (within 1/255 of it on MVTec
    images; OpenCV's INTER_AREA differs from it by up to 0.15 on a LOCO image and INTER_LINEAR,
    which does not antialias, by 0.39), and what the penalty and distillation images already get.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    resized = TF.resize(tensor, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.ascontiguousarray(resized.numpy().transpose(1, 2, 0))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as H x W integers, keeping its values (LOCO grey value = defect type, VisA
    instance ids). Pillow keeps palette indices, which OpenCV would turn into colours."""
    try:
        with Image.open(path) as mask:
            values = np.asarray(mask)
    except UnidentifiedImageError:  # e.g. a float TIFF, which OpenCV reads
        data = np.fromfile(str(path), dtype=np.uint8)
        values = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if values is None:
            raise DatasetError(f"{path}: cannot be read as a mask") from None
    except Exception as error:
        raise DatasetError(f"{path}: cannot be read as a mask ({error})") from error
    return values.max(axis=2) if values.ndim == 3 else values


def _dominant_value(values: np.ndarray) -> int | None:
    nonzero = values[values > 0].astype(np.int64)
    return int(np.bincount(nonzero).argmax()) if nonzero.size else None


def region_saturation(
    region_area: int,
    threshold: float,
    relative: bool,
    image_size: int,
    original_height: int,
    original_width: int,
) -> float:
    """Saturation (in pixels at image_size x image_size) of one LOCO region, for sPRO.

    A relative threshold is a fraction of the region's area; an absolute one is a pixel count at
    the original resolution, scaled to the resized image. Never more than the region's area.
    """
    if relative:
        saturation = threshold * region_area
    else:
        saturation = threshold * (image_size * image_size) / (original_height * original_width)
    return float(min(saturation, region_area))


class AnomalyDataset(Dataset):
    """Records → item dicts (see ARCHITECTURE.md).

    Every item: `image` 3xSxS float [0,1] RGB, `mask` 1xSxS float {0,1}, `label` long,
    `has_mask` bool, `index` long, `padding` bool (an index ≥ len(records) serves a copy of record
    index % len flagged True; see `ShardSampler`), and `category`, `path`, `defect_type`, `anomaly_kind` strings.

    `augment`: an albumentations transform applied after the resize when `train` is True (it gets
    `image=` and `masks=`, and must keep the size).
    `synthesis(image, rng) -> (image, mask)`: adds `synthetic_image` / `synthetic_mask`, made from
    the resized (and augmented) image. Its rng: when `train`, seeded per item from torch's RNG,
    which DataLoader seeds per worker and per epoch (and which keeps advancing in persistent
    workers), so each epoch sees new anomalies and a seeded run repeats them; when not `train`,
    seeded from the item index only, so an evaluation set of synthetic anomalies is fixed.
    `prompts` (training only): adds `prompt_image`, an un-augmented image drawn uniformly from the
    records of the same category (the item's own included, as OneNIP's code draws it), and its
    `prompt_index`; drawn from the same per-item rng as the synthesis.
    `defects_configs` ({category: {pixel_value: (threshold, relative)}}, LOCO): adds `regions`
    KxSxS uint8 (one per mask file) and `region_saturation` K float (0 marks padding and regions
    that vanish at size S). K is the dataset's largest number of mask files (at least 1).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        image_size: int,
        train: bool = False,
        synthesis: Synthesis | None = None,
        defects_configs: Mapping[str, DefectsConfig] | None = None,
        augment: Callable | None = None,
        prompts: bool = False,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.train = train
        self.synthesis = synthesis
        self.augment = augment
        self.defects_configs = dict(defects_configs) if defects_configs is not None else None
        self.max_regions = max([1] + [len(r.mask_paths) for r in self.records])
        self.prompts = prompts
        self.same_category: dict[str, list[int]] = {}
        for position, record in enumerate(self.records):
            self.same_category.setdefault(record.category, []).append(position)
        if self.defects_configs is not None:
            missing = sorted({r.category for r in self.records if r.mask_paths} - set(self.defects_configs))
            if missing:
                raise DatasetError(
                    f"no defects config for categor{'y' if len(missing) == 1 else 'ies'} {missing}"
                )

    def __len__(self) -> int:
        return len(self.records)

    def _synthesis_rng(self, index: int) -> np.random.Generator:
        if self.train:
            stream = int(torch.randint(0, 2**62, ()).item())
            return np.random.default_rng([stream, index])
        return np.random.default_rng([EVAL_SYNTHESIS_SEED, index])

    def _regions(
        self,
        record: SampleRecord,
        binary_masks: np.ndarray,
        values: list[int | None],
        original_shape: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size
        regions = np.zeros((self.max_regions, size, size), dtype=np.uint8)
        saturation = np.zeros(self.max_regions, dtype=np.float32)
        config = self.defects_configs.get(record.category, {}) if record.mask_paths else {}
        for k, (region, value) in enumerate(zip(binary_masks, values)):
            regions[k] = region
            if value is None:  # an all-zero mask file
                continue
            if value not in config:
                raise DatasetError(
                    f"{record.mask_paths[k]}: grey value {value} is not in the defects config of "
                    f"'{record.category}' (known: {sorted(config)})"
                )
            threshold, relative = config[value]
            saturation[k] = region_saturation(int(region.sum()), threshold, relative, size, *original_shape)
        return torch.from_numpy(regions), torch.from_numpy(saturation)

    def __getitem__(self, index: int) -> dict:
        padding = index >= len(self.records)  # ShardSampler's padding for an otherwise empty process
        index = index % len(self.records)
        record = self.records[index]
        image = read_image(record.image_path)
        original_shape = image.shape[:2]
        mask_values = [read_mask(path) for path in record.mask_paths]
        for path, values in zip(record.mask_paths, mask_values):
            if values.shape != original_shape:
                raise DatasetError(
                    f"{path}: mask size {values.shape[1]}x{values.shape[0]} differs from image "
                    f"{original_shape[1]}x{original_shape[0]}"
                )
        grey_values = [_dominant_value(values) for values in mask_values]
        binary = [(values > 0).astype(np.uint8) for values in mask_values]

        size = self.image_size
        resized = {"image": resize_image(image, size, size)}
        if binary:  # masks keep hard 0/1 edges: nearest neighbour
            resized["masks"] = [cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) for mask in binary]
        if self.train and self.augment is not None:
            resized = self.augment(**resized) if binary else self.augment(image=resized["image"])
        image = np.ascontiguousarray(resized["image"], dtype=np.float32)
        masks = (
            np.asarray(resized["masks"], dtype=np.uint8) if binary else np.zeros((0, size, size), np.uint8)
        )
        union = masks.max(axis=0) if len(masks) else np.zeros((size, size), np.uint8)

        item = {
            "image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(union.astype(np.float32))[None],
            "label": torch.tensor(record.label, dtype=torch.long),
            "has_mask": torch.tensor(record.has_mask, dtype=torch.bool),
            "index": torch.tensor(index, dtype=torch.long),
            "padding": torch.tensor(padding, dtype=torch.bool),
            "category": record.category,
            "path": str(record.image_path),
            "defect_type": record.defect_type,
            "anomaly_kind": record.anomaly_kind,
        }
        rng = self._synthesis_rng(index) if self.synthesis is not None or self.prompts else None
        if self.prompts:
            choices = self.same_category[record.category]
            prompt_index = choices[int(rng.integers(len(choices)))]
            prompt = resize_image(read_image(self.records[prompt_index].image_path), size, size)
            item["prompt_image"] = torch.from_numpy(np.ascontiguousarray(prompt.transpose(2, 0, 1), np.float32))
            item["prompt_index"] = torch.tensor(prompt_index, dtype=torch.long)
        if self.synthesis is not None:
            synthetic, synthetic_mask = self.synthesis(image, rng)
            item["synthetic_image"] = torch.from_numpy(
                np.ascontiguousarray(synthetic.transpose(2, 0, 1), np.float32)
            )
            item["synthetic_mask"] = torch.from_numpy(np.asarray(synthetic_mask, np.float32))[None]
        if self.defects_configs is not None:
            item["regions"], item["region_saturation"] = self._regions(
                record, masks, grey_values, original_shape
            )
        return item
