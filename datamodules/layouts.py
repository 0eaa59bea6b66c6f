"""Scanners that turn a benchmark's folder layout into `SampleRecord`s.

A scanner only lists files and states which mask files it expects (even when they are missing);
`validate.validate_records` then checks that all of them exist and are readable. The layouts
follow the official downloads (see `../shared/anchors.md`, section A.4):

- `mvtec_ad`:   <cat>/{train/good, test/good, test/<defect>}, ground_truth/<defect>/<stem>_mask.png
- `mvtec_loco`: <cat>/{train/good, validation/good, test/good, test/{logical,structural}_anomalies},
                ground_truth/<kind>_anomalies/<stem>/*.png (one file per region), defects_config.json
- `visa`:       split_csv/1cls.csv (object, split, label, image, mask; paths relative to the root)
- `btad`:       <cat>/{train/ok, test/ok, test/ko}, ground_truth/ko/<stem>.png, images .bmp or .png
- `mpdd`:       as mvtec_ad, masks named <stem>_mask.png or <stem>.png
- `folder`:     as mvtec_ad with any image type; ground_truth/<defect>/ is optional per defect
                (without it that defect's images are label-only)
- `embedded`:   the procedurally generated LOCO-style dataset, written on first use
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from datamodules.records import SampleRecord
from datamodules.validate import DatasetError

LAYOUTS = ("mvtec_ad", "mvtec_loco", "visa", "btad", "mpdd", "folder", "embedded")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_EMBEDDED_ROOT = "data/embedded"
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


# ---------------------------------------------------------------------------- file listing


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (case-insensitive extensions, dotfiles skipped), sorted by name."""
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path
        for path in candidates
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _records(images, category, split, label, defect_type, anomaly_kind, masks_for=None):
    return [
        SampleRecord(
            image_path=image,
            label=label,
            category=category,
            split=split,
            defect_type=defect_type,
            anomaly_kind=anomaly_kind,
            mask_paths=masks_for(image) if masks_for else (),
        )
        for image in images
    ]


def _normal(folder: Path, category: str, split: str) -> list[SampleRecord]:
    return _records(list_images(folder), category, split, 0, "good", "good")


class _MaskIndex:
    """Mask files of one ground-truth folder, looked up by image stem.

    Accepts `<stem>_mask.<ext>` and `<stem>.<ext>`; when a mask is missing it names the file it
    expected, following the naming the other masks in the folder use (MVTec: `_mask`)."""

    def __init__(self, folder: Path, extensions: tuple[str, ...], suffixes: tuple[str, ...]):
        self.folder = folder
        self.by_stem: dict[str, Path] = {}
        files = [p for p in list_images(folder) if p.suffix.lower() in extensions]
        for suffix in reversed(suffixes):  # earlier suffixes win
            for path in files:
                if suffix and path.stem.endswith(suffix):
                    self.by_stem[path.stem[: -len(suffix)]] = path
                elif not suffix:
                    self.by_stem[path.stem] = path
        self.expected_suffix = suffixes[0]
        if len(suffixes) > 1:  # follow the majority naming of the masks that are there
            with_first_suffix = sum(p.stem.endswith(suffixes[0]) for p in files)
            self.expected_suffix = suffixes[0] if with_first_suffix * 2 >= len(files) else suffixes[1]

    def __call__(self, image: Path) -> tuple[Path, ...]:
        found = self.by_stem.get(image.stem)
        return (found or self.folder / f"{image.stem}{self.expected_suffix}.png",)


# ---------------------------------------------------------------------------- one scanner per layout


def _scan_mvtec_style(
    category_dir: Path,
    category: str,
    suffixes: tuple[str, ...],
    mask_extensions: tuple[str, ...],
    masks_optional: bool = False,
) -> list[SampleRecord]:
    records = _normal(category_dir / "train" / "good", category, "train")
    records += _normal(category_dir / "test" / "good", category, "test")
    for defect_dir in _subfolders(category_dir / "test"):
        if defect_dir.name == "good":
            continue
        ground_truth = category_dir / "ground_truth" / defect_dir.name
        masks_for = (
            None
            if masks_optional and not ground_truth.is_dir()
            else _MaskIndex(ground_truth, mask_extensions, suffixes)
        )
        records += _records(
            list_images(defect_dir), category, "test", 1, defect_dir.name, "anomaly", masks_for
        )
    return records


def _scan_mvtec_ad(category_dir: Path, category: str) -> list[SampleRecord]:
    return _scan_mvtec_style(category_dir, category, suffixes=("_mask",), mask_extensions=(".png",))


def _scan_mpdd(category_dir: Path, category: str) -> list[SampleRecord]:
    return _scan_mvtec_style(category_dir, category, suffixes=("_mask", ""), mask_extensions=(".png",))


def _scan_folder(category_dir: Path, category: str) -> list[SampleRecord]:
    return _scan_mvtec_style(
        category_dir, category, suffixes=("_mask", ""), mask_extensions=IMAGE_EXTENSIONS, masks_optional=True
    )


def _scan_btad(category_dir: Path, category: str) -> list[SampleRecord]:
    records = _records(list_images(category_dir / "train" / "ok"), category, "train", 0, "good", "good")
    records += _records(list_images(category_dir / "test" / "ok"), category, "test", 0, "good", "good")
    masks = _MaskIndex(category_dir / "ground_truth" / "ko", (".png", ".bmp"), suffixes=("",))
    records += _records(
        list_images(category_dir / "test" / "ko"), category, "test", 1, "ko", "anomaly", masks
    )
    return records


def _loco_kind(defect_folder: str) -> str:
    for kind in ("logical", "structural"):
        if defect_folder.startswith(kind):
            return kind
    return "anomaly"


def _scan_mvtec_loco(category_dir: Path, category: str) -> list[SampleRecord]:
    records = _normal(category_dir / "train" / "good", category, "train")
    records += _normal(category_dir / "validation" / "good", category, "validation")
    records += _normal(category_dir / "test" / "good", category, "test")
    for defect_dir in _subfolders(category_dir / "test"):
        if defect_dir.name == "good":
            continue
        ground_truth = category_dir / "ground_truth" / defect_dir.name

        def region_masks(image: Path, ground_truth=ground_truth) -> tuple[Path, ...]:
            # One folder per image, one file per defect region. An empty or missing folder is
            # passed on as the folder itself, so validation reports it as a missing mask.
            files = [p for p in list_images(ground_truth / image.stem) if p.suffix.lower() == ".png"]
            return tuple(files) or (ground_truth / image.stem,)

        kind = _loco_kind(defect_dir.name)
        records += _records(list_images(defect_dir), category, "test", 1, defect_dir.name, kind, region_masks)
    return records


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} does not exist (expected <root>/{VISA_SPLIT_CSV})")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {missing}; found {reader.fieldnames}")
        return [{key: (value or "").strip() for key, value in row.items() if key} for row in reader]


def _scan_visa(root: Path, categories: list[str]) -> list[SampleRecord]:
    csv_path = root / VISA_SPLIT_CSV
    wanted = set(categories)
    records, problems = [], []
    for line, row in enumerate(_read_visa_csv(root), start=2):
        if row["object"] not in wanted:
            continue
        where = f"{csv_path} line {line}"
        if row["split"] not in ("train", "test"):
            problems.append(f"{where}: split '{row['split']}' is not train or test")
            continue
        if row["label"] not in ("normal", "anomaly"):
            problems.append(f"{where}: label '{row['label']}' is not normal or anomaly")
            continue
        anomalous = row["label"] == "anomaly"
        if anomalous and not row["mask"]:
            problems.append(f"{where}: anomaly {row['image']} has no mask path")
            continue
        records.append(
            SampleRecord(
                image_path=root / row["image"],
                label=int(anomalous),
                category=row["object"],
                split=row["split"],
                defect_type="bad" if anomalous else "good",
                anomaly_kind="anomaly" if anomalous else "good",
                mask_paths=(root / row["mask"],) if anomalous else (),
            )
        )
    if problems:
        raise DatasetError("VisA split file problems:\n" + "\n".join(f"  - {p}" for p in problems))
    order = {name: position for position, name in enumerate(categories)}
    return sorted(records, key=lambda r: (order[r.category], r.split != "train", r.label, str(r.image_path)))


_CATEGORY_SCANNERS: dict[str, Callable[[Path, str], list[SampleRecord]]] = {
    "mvtec_ad": _scan_mvtec_ad,
    "mvtec_loco": _scan_mvtec_loco,
    "btad": _scan_btad,
    "mpdd": _scan_mpdd,
    "folder": _scan_folder,
    "embedded": _scan_mvtec_loco,
}


# ---------------------------------------------------------------------------- public entry points


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")


def resolve_root(layout: str, root: str | Path | None, seed: int = 0) -> Path:
    """The folder to scan. For `embedded` this writes the generated dataset on first use."""
    _check_layout(layout)
    if layout == "embedded":
        from datamodules.embedded import ensure_embedded_dataset  # lazy: generation code is only needed here

        return Path(ensure_embedded_dataset(root if root is not None else DEFAULT_EMBEDDED_ROOT, seed))
    if root is None:
        raise DatasetError(f"layout '{layout}' needs a dataset root (data.root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} does not exist or is not a folder (layout '{layout}')")
    return path


def _categories_under(layout: str, root: Path) -> list[str]:
    if layout == "visa":
        return sorted({row["object"] for row in _read_visa_csv(root) if row["object"]})
    return [d.name for d in _subfolders(root) if (d / "train").is_dir() or (d / "test").is_dir()]


def list_categories(layout: str, root: str | Path | None, seed: int = 0) -> list[str]:
    """Category names found under `root` for this layout, sorted."""
    return _categories_under(layout, resolve_root(layout, root, seed))


def _requested(categories: str | list[str] | tuple[str, ...]) -> list[str] | None:
    """None means all; a string may hold one name or a comma-separated list."""
    names = [categories] if isinstance(categories, str) else list(categories)
    names = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    if not names or names == ["all"]:
        return None
    return list(dict.fromkeys(names))


def select_categories(layout: str, root: Path, categories: str | list[str]) -> list[str]:
    """Resolve `categories` ("all", a name, a list) against what exists under `root`."""
    available = _categories_under(layout, root)
    requested = _requested(categories)
    if requested is None:
        if not available:
            hint = ""
            if (root / "train").is_dir() or (root / "test").is_dir():
                hint = f"; {root} looks like a category folder: use its parent as root and '{root.name}' as category"
            raise DatasetError(f"no categories found under {root} (layout '{layout}'){hint}")
        return available
    exists = (lambda name: name in available) if layout == "visa" else (lambda name: (root / name).is_dir())
    unknown = [name for name in requested if not exists(name)]
    if unknown:
        raise DatasetError(
            f"categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(repr(n) for n in unknown)} not found under "
            f"{root} (layout '{layout}'); categories there: {', '.join(available) or 'none'}"
        )
    return requested


def scan(
    layout: str, root: str | Path | None, categories: str | list[str] = "all", seed: int = 0
) -> list[SampleRecord]:
    """List every sample of the chosen categories. Checks nothing inside the files; see
    `validate.validate_records`."""
    path = resolve_root(layout, root, seed)
    return scan_resolved(layout, path, select_categories(layout, path, categories))


def scan_resolved(layout: str, root: Path, categories: list[str]) -> list[SampleRecord]:
    """`scan` for a root already returned by `resolve_root` and categories from `select_categories`."""
    _check_layout(layout)
    if layout == "visa":
        return _scan_visa(root, categories)
    scanner = _CATEGORY_SCANNERS[layout]
    return [record for name in categories for record in scanner(root / name, name)]


def ground_truth_doubts(layout: str, root: Path, categories: list[str]) -> list[str]:
    """Ground-truth folders that match no test folder, in layouts where masks are optional per defect
    (`folder`): a misspelt `ground_truth/<defect>` would otherwise silently turn that defect into a
    label-only one and drop the category's pixel metrics."""
    if layout != "folder":
        return []
    doubts = []
    for category in categories:
        tests = {folder.name for folder in _subfolders(root / category / "test")}
        for folder in _subfolders(root / category / "ground_truth"):
            if folder.name not in tests:
                doubts.append(
                    f"{folder}: no test/{folder.name} folder matches this ground-truth folder (test folders: "
                    f"{', '.join(sorted(tests - {'good'})) or 'none'}); its masks are not used"
                )
    return doubts


def load_defects_config(root: str | Path, category: str) -> dict[int, tuple[float, bool]]:
    """LOCO `defects_config.json` as {pixel_value: (saturation_threshold, relative_saturation)}."""
    path = Path(root) / category / "defects_config.json"
    if not path.is_file():
        raise DatasetError(f"missing defects config {path} (MVTec LOCO needs it for sPRO)")
    try:
        entries = json.loads(path.read_text())
        return {
            int(entry["pixel_value"]): (
                float(entry["saturation_threshold"]),
                bool(entry["relative_saturation"]),
            )
            for entry in entries
        }
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{path}: expected a list of records with pixel_value, saturation_threshold, "
            f"relative_saturation ({type(error).__name__}: {error})"
        ) from error
