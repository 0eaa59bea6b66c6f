"""Tiny fake dataset trees in each benchmark's on-disk layout, for the data tests.

Images are 32x32 (unless a builder says otherwise) with random content; masks are 0/255 (LOCO:
the defect's grey value; VisA: instance ids 1, 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def random_rgb(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_image(path: Path, array: np.ndarray) -> Path:
    """Write with Pillow; the format follows the suffix (PNG, BMP, JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def block_mask(
    value: int = 255, rows=(8, 16), cols=(8, 16), height: int = SIZE, width: int = SIZE
) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = value
    return mask


def write_images(folder: Path, count: int, suffix: str = ".png", seed: int = 0, start: int = 0) -> list[Path]:
    return [
        write_image(folder / f"{i:03d}{suffix}", random_rgb(seed + i)) for i in range(start, start + count)
    ]


def make_mvtec_ad(
    root: Path, categories=("bottle", "cable"), n_train: int = 5, n_test_good: int = 2, defects=None
) -> Path:
    """<cat>/{train/good, test/good, test/<defect>}, ground_truth/<defect>/<stem>_mask.png."""
    defects = defects or {"crack": 2, "scratch": 1}
    for c, category in enumerate(categories):
        base = root / category
        write_images(base / "train" / "good", n_train, seed=100 * c)
        write_images(base / "test" / "good", n_test_good, seed=100 * c + 50)
        for defect, count in defects.items():
            for image in write_images(base / "test" / defect, count, seed=100 * c + 70):
                write_image(base / "ground_truth" / defect / f"{image.stem}_mask.png", block_mask())
    (root / "license.txt").write_text("not a category")
    return root


LOCO_CONFIG = [
    {
        "defect_name": "missing_part",
        "pixel_value": 255,
        "saturation_threshold": 40,
        "relative_saturation": False,
    },
    {
        "defect_name": "extra_part",
        "pixel_value": 254,
        "saturation_threshold": 0.5,
        "relative_saturation": True,
    },
    {"defect_name": "scratch", "pixel_value": 253, "saturation_threshold": 1.0, "relative_saturation": True},
]


def make_mvtec_loco(
    root: Path,
    category: str = "juice",
    n_train: int = 4,
    n_validation: int = 2,
    n_test_good: int = 2,
    with_validation: bool = True,
) -> Path:
    """LOCO tree: test/logical_anomalies/000 has two region masks (255 top-left block, 254
    bottom-right block), 001 one; test/structural_anomalies/000 one (253)."""
    base = root / category
    write_images(base / "train" / "good", n_train, seed=1)
    if with_validation:
        write_images(base / "validation" / "good", n_validation, seed=20)
    write_images(base / "test" / "good", n_test_good, seed=40)
    write_images(base / "test" / "logical_anomalies", 2, seed=60)
    write_images(base / "test" / "structural_anomalies", 1, seed=80)
    logical = base / "ground_truth" / "logical_anomalies"
    write_image(logical / "000" / "000.png", block_mask(255, rows=(0, 8), cols=(0, 8)))
    write_image(logical / "000" / "001.png", block_mask(254, rows=(20, 28), cols=(20, 30)))
    write_image(logical / "001" / "000.png", block_mask(254))
    write_image(base / "ground_truth" / "structural_anomalies" / "000" / "000.png", block_mask(253))
    (base / "defects_config.json").write_text(json.dumps(LOCO_CONFIG))
    return root


def make_visa(
    root: Path, objects=("candle", "pcb1"), n_train: int = 3, n_test_good: int = 2, n_anomaly: int = 2
) -> Path:
    """Raw VisA: <object>/Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png with
    instance ids, and split_csv/1cls.csv listing them relative to the root."""
    rows = []
    for o, obj in enumerate(objects):
        data = root / obj / "Data"
        for i in range(n_train + n_test_good):
            image = write_image(data / "Images" / "Normal" / f"{i:04d}.JPG", random_rgb(10 * o + i))
            split = "train" if i < n_train else "test"
            rows.append([obj, split, "normal", image.relative_to(root).as_posix(), ""])
        for i in range(n_anomaly):
            image = write_image(data / "Images" / "Anomaly" / f"{i:03d}.JPG", random_rgb(10 * o + 7 + i))
            instances = block_mask(1, rows=(0, 6), cols=(0, 6)) + block_mask(2, rows=(20, 26), cols=(20, 26))
            mask = write_image(data / "Masks" / "Anomaly" / f"{i:03d}.png", instances)
            rows.append(
                [
                    obj,
                    "test",
                    "anomaly",
                    image.relative_to(root).as_posix(),
                    mask.relative_to(root).as_posix(),
                ]
            )
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_btad(root: Path, category: str = "01") -> Path:
    """<cat>/{train/ok, test/ok, test/ko} with .bmp and .png images; ground_truth/ko/<stem>.png."""
    base = root / category
    write_images(base / "train" / "ok", 3, suffix=".bmp", seed=1)
    write_images(base / "train" / "ok", 1, suffix=".png", seed=5, start=3)
    write_images(base / "test" / "ok", 2, suffix=".bmp", seed=10)
    anomalies = write_images(base / "test" / "ko", 2, suffix=".bmp", seed=20)
    anomalies += write_images(base / "test" / "ko", 1, suffix=".png", seed=30, start=2)
    for image in anomalies:
        write_image(base / "ground_truth" / "ko" / f"{image.stem}.png", block_mask())
    return root


def make_mpdd(root: Path, category: str = "tubes") -> Path:
    """MVTec-like; masks of defect `anomalous` named <stem>.png, of `dent` named <stem>_mask.png."""
    base = root / category
    write_images(base / "train" / "good", 3, seed=1)
    write_images(base / "test" / "good", 1, seed=10)
    for image in write_images(base / "test" / "anomalous", 2, seed=20):
        write_image(base / "ground_truth" / "anomalous" / f"{image.stem}.png", block_mask())
    for image in write_images(base / "test" / "dent", 1, seed=30):
        write_image(base / "ground_truth" / "dent" / f"{image.stem}_mask.png", block_mask())
    return root


def make_folder(root: Path, category: str = "widget") -> Path:
    """Custom layout: mixed extensions (.png, .JPG, .Jpeg, .bmp), dotfiles to skip, a defect
    `dent` with ground truth (both mask namings) and a defect `stain` without (label only)."""
    base = root / category
    write_image(base / "train" / "good" / "a.png", random_rgb(1))
    write_image(base / "train" / "good" / "b.JPG", random_rgb(2))
    write_image(base / "train" / "good" / "c.Jpeg", random_rgb(3))
    write_image(base / "train" / "good" / "._a.png", random_rgb(4))  # macOS resource fork
    (base / "train" / "good" / ".DS_Store").write_bytes(b"\x00\x01")
    (base / "train" / "good" / "notes.txt").write_text("not an image")
    write_image(base / "test" / "good" / "g.bmp", random_rgb(5))
    write_image(base / "test" / "dent" / "d1.png", random_rgb(6))
    write_image(base / "test" / "dent" / "d2.png", random_rgb(7))
    write_image(base / "ground_truth" / "dent" / "d1_mask.png", block_mask())
    write_image(base / "ground_truth" / "dent" / "d2.png", block_mask())
    write_image(base / "test" / "stain" / "s1.jpg", random_rgb(8))
    return root
