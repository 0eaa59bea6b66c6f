"""What a user sees after testing: the run folder, W&B and a rich results table.

This module only presents numbers that were computed elsewhere (`metrics.py`, `base.py`); it holds no
metric computation and no Lightning training logic, so every function here is plain data in, files or
log calls out, and can be tested without a model.

Run folder layout written here:
    metrics.json                                  {"run": ..., "per_category": ..., "mean": ...}
    scores.csv                                    one row per test image
    maps/<category>/<defect_type>_<stem>.png      [image | mask contour | heatmap] panels
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

# Column order of the results table and key order in metrics.json; metrics not listed here follow
# in alphabetical order, so nothing computed is ever hidden.
METRIC_ORDER = (
    "image_AUROC",
    "image_AP",
    "image_F1max",
    "pixel_AUROC",
    "pixel_AP",
    "pixel_AUPRO",
    "pixel_sPRO",
)
MEAN_GROUP = "mean"
ALL_SUBSET = "all"
# "all" first, then the MVTec LOCO subsets; any other subset name follows alphabetically.
SUBSET_ORDER = (ALL_SUBSET, "logical", "structural")
SCORE_COLUMNS = ("path", "category", "defect_type", "anomaly_kind", "label", "score", "predicted_label")
HEATMAP_COLORMAP = cv2.COLORMAP_JET  # anomalib's choice; its top colour is dark red
MASK_CONTOUR_RGB = (255, 0, 0)
MISSING_VALUE_TEXT = "–"
MIN_PANEL_SIZE = 256  # saved map panels are upscaled to at least this many pixels a side, so a caption reads
PANEL_CAPTION_HEIGHT = 40  # the white caption strip above the saved panels
COLOUR_BAR_WIDTH, COLOUR_BAR_LABEL_WIDTH = 24, 120

RowKey = tuple[str, str]
Rows = dict[RowKey, dict[str, float]]


def _order_index(name: str, order: Sequence[str]) -> tuple[int, str]:
    """Sort key: names in `order` first in that order, then the rest alphabetically."""
    return (order.index(name), "") if name in order else (len(order), name)


def ordered_metric_names(names: Iterable[str]) -> list[str]:
    """Metric names in the house order (METRIC_ORDER, then alphabetical)."""
    return sorted(set(names), key=lambda name: _order_index(name, METRIC_ORDER))


def _ordered_subsets(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda name: _order_index(name, SUBSET_ORDER))


def _ordered_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {name: float(metrics[name]) for name in ordered_metric_names(metrics)}


@dataclass
class MetricsTable:
    """rows[(group, subset)] = {metric_name: value}; group is a category name or "mean"; subset is "all", or for
    MVTec LOCO-style data "logical" / "structural" (good images + that kind only)."""

    rows: dict[tuple[str, str], dict[str, float]]

    def categories(self) -> list[str]:
        """Category names in display order (alphabetical), without "mean"."""
        return sorted({group for group, _ in self.rows if group != MEAN_GROUP})

    def ordered_keys(self) -> list[RowKey]:
        """Row keys in display order: categories alphabetically, then "mean"; subsets "all" first."""
        keys = []
        for group in [*self.categories(), MEAN_GROUP]:
            subsets = _ordered_subsets(subset for row_group, subset in self.rows if row_group == group)
            keys.extend((group, subset) for subset in subsets)
        return keys

    def metric_names(self) -> list[str]:
        """Every metric that appears in any row, in the house order."""
        return ordered_metric_names(name for metrics in self.rows.values() for name in metrics)

    def mean_coverage(self) -> dict[str, dict[str, tuple[int, int]]]:
        """{subset: {metric: (categories with a value, categories with that subset)}}: how many categories
        each mean averages. A category whose value is NaN (e.g. no masks, so no pixel metrics) is not in it."""
        coverage: dict[str, dict[str, tuple[int, int]]] = {}
        for group, subset in self.ordered_keys():
            if group != MEAN_GROUP:
                continue
            categories = [metrics for (g, s), metrics in self.rows.items() if g != MEAN_GROUP and s == subset]
            coverage[subset] = {
                name: (sum(1 for m in categories if not math.isnan(m.get(name, math.nan))), len(categories))
                for name in ordered_metric_names(self.rows[(group, subset)])
            }
        return coverage

    def to_nested(self) -> dict:
        """{"per_category": {cat: {subset: {...}}}, "mean": {subset: {...}}, "mean_coverage": {subset: {metric:
        {"categories": n, "of": total}}}} in display order."""
        nested: dict[str, dict] = {"per_category": {}, MEAN_GROUP: {}}
        for group, subset in self.ordered_keys():
            target = (
                nested[MEAN_GROUP] if group == MEAN_GROUP else nested["per_category"].setdefault(group, {})
            )
            target[subset] = _ordered_metrics(self.rows[(group, subset)])
        nested["mean_coverage"] = {
            subset: {name: {"categories": covered, "of": total} for name, (covered, total) in metrics.items()}
            for subset, metrics in self.mean_coverage().items()
        }
        return nested

    @classmethod
    def from_nested(cls, d: Mapping) -> MetricsTable:
        """Inverse of `to_nested`; null (None) values, as read back from metrics.json, become NaN."""

        def as_float(value: float | None) -> float:
            return math.nan if value is None else float(value)

        rows: Rows = {}
        for category, subsets in d.get("per_category", {}).items():
            for subset, metrics in subsets.items():
                rows[(category, subset)] = {name: as_float(value) for name, value in metrics.items()}
        for subset, metrics in d.get(MEAN_GROUP, {}).items():
            rows[(MEAN_GROUP, subset)] = {name: as_float(value) for name, value in metrics.items()}
        return cls(rows)

    def flat(self, prefix: str = "test") -> dict[str, float]:
        """{"test/woven_tiles/image_AUROC": .., "test/mean/logical/image_AUROC": ..}; subset "all" is omitted."""
        flat = {}
        for group, subset in self.ordered_keys():
            key_stem = f"{prefix}/{group}" if subset == ALL_SUBSET else f"{prefix}/{group}/{subset}"
            for name, value in _ordered_metrics(self.rows[(group, subset)]).items():
                flat[f"{key_stem}/{name}"] = value
        return flat


def compute_mean_rows(rows_per_category: Mapping[RowKey, Mapping[str, float]]) -> Rows:
    """The ("mean", subset) rows only: per subset and metric, the mean over categories, ignoring NaN.

    A metric that is NaN (or absent) for every category stays NaN. Existing "mean" rows in the input are
    ignored, so the function can be applied to a table that already has them. Merge with
    `{**rows, **compute_mean_rows(rows)}`.
    """
    values: dict[RowKey, dict[str, list[float]]] = {}
    for (group, subset), metrics in rows_per_category.items():
        if group == MEAN_GROUP:
            continue
        per_metric = values.setdefault((MEAN_GROUP, subset), {})
        for name, value in metrics.items():
            per_metric.setdefault(name, []).append(float(value))
    mean_rows: Rows = {}
    for key, per_metric in values.items():
        mean_rows[key] = {}
        for name in ordered_metric_names(per_metric):
            finite = [value for value in per_metric[name] if not math.isnan(value)]
            mean_rows[key][name] = math.fsum(finite) / len(finite) if finite else math.nan
    return mean_rows


def _json_ready(value: Any) -> Any:
    """NaN/inf → None (strict JSON has no NaN); numpy scalars/arrays and Paths → plain Python."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file next to `path`, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_metrics_json(path: str | Path, table: MetricsTable, run_info: dict) -> None:
    """metrics.json: {"run": run_info, "per_category": ..., "mean": ...}; NaN written as null."""
    document = {"run": run_info, **table.to_nested()}
    text = json.dumps(_json_ready(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    _atomic_write_text(Path(path), text)


def read_metrics_json(path: str | Path) -> tuple[MetricsTable, dict]:
    """(table, run_info) from a metrics.json written by `write_metrics_json`; nulls become NaN."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    return MetricsTable.from_nested(document), document.get("run", {})


def write_scores_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """scores.csv: one row per test image with the columns SCORE_COLUMNS, sorted by (category, path).

    Sorting makes the file independent of batch and rank order, so two runs can be diffed. Scores are
    written with `repr(float)`, which round-trips exactly.
    """
    for index, row in enumerate(rows):
        missing = [column for column in SCORE_COLUMNS if column not in row]
        if missing:
            raise ValueError(f"scores.csv row {index} ({row.get('path', '?')}) lacks the columns {missing}")
    ordered = sorted(rows, key=lambda row: (str(row["category"]), str(row["path"])))
    lines: list[str] = []

    class _LineSink:  # csv.writer needs a file-like object; collecting lines lets the write stay atomic
        def write(self, text: str) -> None:
            lines.append(text)

    writer = csv.writer(_LineSink(), lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for row in ordered:
        writer.writerow(
            [
                str(row["path"]),
                str(row["category"]),
                str(row["defect_type"]),
                str(row["anomaly_kind"]),
                int(row["label"]),
                repr(float(row["score"])),
                int(row["predicted_label"]),
            ]
        )
    _atomic_write_text(Path(path), "".join(lines))


def read_scores_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a scores.csv with `label` and `predicted_label` as int and `score` as float (exact).

    Files written before the decision threshold existed have no `predicted_label`: it reads as None.
    """
    with open(path, encoding="utf-8", newline="") as stream:
        return [
            {**row, "label": int(row["label"]), "score": float(row["score"]),
             "predicted_label": int(row["predicted_label"]) if row.get("predicted_label") else None}
            for row in csv.DictReader(stream)
        ]


@dataclass
class MapSample:  # one test image chosen for display
    image: np.ndarray  # H×W×3 float32 in [0,1], RGB
    mask: np.ndarray  # H×W float32 {0,1}
    anomaly_map: np.ndarray  # H×W float32 (raw, any scale)
    path: str
    category: str
    defect_type: str
    label: int
    score: float
    role: str = ""  # why it is shown: "detected" (a high-scoring anomaly), "missed" (a low-scoring one), "false alarm"


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _as_2d(array: np.ndarray, what: str, path: str) -> np.ndarray:
    """A float32 H×W array; leading singleton axes (1×H×W from a B×1×H×W batch) are dropped."""
    array = np.asarray(array, dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"{what} of {path} must be H×W, got shape {array.shape}")
    return array


def _resized(array: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    if array.shape[:2] == (height, width):
        return array
    return cv2.resize(array, (width, height), interpolation=interpolation)


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """H×W×3 uint8 RGB colour map of `anomaly_map` on the fixed scale vmin..vmax (values outside are clipped).

    A fixed, dataset-level scale keeps normal images looking normal (per-image scaling would stretch noise).
    """
    scaled = (np.nan_to_num(np.asarray(anomaly_map, dtype=np.float64), nan=vmin) - vmin) / max(
        vmax - vmin, 1e-12
    )
    levels = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, HEATMAP_COLORMAP), cv2.COLOR_BGR2RGB)


def caption_text(sample: MapSample) -> str:
    return f"{sample.category} | {sample.defect_type} | score {sample.score:.4g}"


def _draw_caption(panel: np.ndarray, text: str) -> None:
    """Write `text` in the panel's top-left corner, shrunk to fit; skipped when the panel is too small to read."""
    height, width = panel.shape[:2]
    if width < 96 or height < 48:
        return
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = min(width / 400.0, 1.0)
    (text_width, text_height), _ = cv2.getTextSize(text, font, scale, 1)
    if text_width > width - 4:
        scale *= (width - 4) / text_width
        (text_width, text_height), _ = cv2.getTextSize(text, font, scale, 1)
    origin = (2, text_height + 3)
    cv2.putText(panel, text, origin, font, scale, (0, 0, 0), 3, cv2.LINE_AA)  # outline for contrast
    cv2.putText(panel, text, origin, font, scale, (255, 255, 255), 1, cv2.LINE_AA)


def render_map_panel(
    sample: MapSample, vmin: float, vmax: float, *, heatmap_alpha: float = 0.5, caption: bool = True
) -> np.ndarray:
    """H×(3W)×3 uint8 RGB: [image | image with mask contour | image blended with the heatmap].

    The map is coloured on the fixed scale vmin..vmax and blended as `alpha·heat + (1−alpha)·image`.
    The caption (category, defect, score) goes on the middle panel only, so the raw image and the heatmap
    stay untouched for inspection; it is left out on panels narrower than 96 px.
    """
    image = _to_uint8_rgb(sample.image)
    height, width = image.shape[:2]
    mask = _resized(_as_2d(sample.mask, "mask", sample.path), height, width, cv2.INTER_NEAREST) > 0.5
    anomaly_map = _as_2d(sample.anomaly_map, "anomaly_map", sample.path)
    anomaly_map = _resized(anomaly_map, height, width, cv2.INTER_LINEAR)

    with_contour = image.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(height, width) / 128))
    cv2.drawContours(with_contour, contours, -1, MASK_CONTOUR_RGB, thickness)
    if caption:
        _draw_caption(with_contour, caption_text(sample))

    heat = heatmap_rgb(anomaly_map, vmin, vmax)
    blended = cv2.addWeighted(heat, heatmap_alpha, image, 1.0 - heatmap_alpha, 0.0)
    return np.concatenate([image, with_contour, blended], axis=1)


def _upscaled(sample: MapSample, size: int) -> MapSample:
    """The sample resized so its shorter side is at least `size` (image and map bilinear, mask nearest)."""
    height, width = np.asarray(sample.image).shape[:2]
    factor = max(1.0, size / min(height, width))
    if factor == 1.0:
        return sample
    new_height, new_width = round(height * factor), round(width * factor)
    image = cv2.resize(np.asarray(sample.image, np.float32), (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    mask = _resized(_as_2d(sample.mask, "mask", sample.path), new_height, new_width, cv2.INTER_NEAREST)
    anomaly_map = _resized(_as_2d(sample.anomaly_map, "anomaly_map", sample.path), new_height, new_width,
                           cv2.INTER_LINEAR)
    return dataclasses.replace(sample, image=image, mask=mask, anomaly_map=anomaly_map)


def _colour_bar(height: int, vmin: float, vmax: float) -> np.ndarray:
    """The heatmap's scale beside the panels: the high end (anomalous) at the top, the low end at the bottom."""
    levels = np.linspace(1.0, 0.0, height)[:, None] * (vmax - vmin) + vmin
    bar = heatmap_rgb(np.repeat(levels, COLOUR_BAR_WIDTH, axis=1), vmin, vmax)
    labels = np.full((height, COLOUR_BAR_LABEL_WIDTH, 3), 255, np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    for text, y in ((f"{vmax:.3g}", 14), ("anomalous", 30), ("normal", height - 22), (f"{vmin:.3g}", height - 6)):
        cv2.putText(labels, text, (4, y), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, labels], axis=1)


def _caption_strip(width: int, text: str) -> np.ndarray:
    """A white strip with `text` in black, shrunk only as far as needed to fit the width."""
    strip = np.full((PANEL_CAPTION_HEIGHT, width, 3), 255, np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.7
    (text_width, _), _ = cv2.getTextSize(text, font, scale, 1)
    if text_width > width - 8:
        scale *= (width - 8) / text_width
    cv2.putText(strip, text, (4, PANEL_CAPTION_HEIGHT - 13), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def presentation_panel(sample: MapSample, vmin: float, vmax: float, **render_options: Any) -> np.ndarray:
    """What maps/ holds: the three panels at least MIN_PANEL_SIZE a side, a colour bar with the scale and its
    meaning on the right, and the caption (why the image is shown, category, defect, score, file) above."""
    panels = render_map_panel(_upscaled(sample, MIN_PANEL_SIZE), vmin, vmax, caption=False, **render_options)
    body = np.concatenate([panels, _colour_bar(panels.shape[0], vmin, vmax)], axis=1)
    role = f"{sample.role}: " if sample.role else ""
    caption = f"{role}{caption_text(sample)} | {Path(sample.path).name}"
    return np.concatenate([_caption_strip(body.shape[1], caption), body], axis=0)


def _safe_name(name: str) -> str:
    """A file-system-safe path component (defect folder names can hold spaces or separators)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def save_map_panels(
    out_dir: str | Path, samples: Sequence[MapSample], vmin: float, vmax: float, **render_options: Any
) -> list[Path]:
    """One PNG per sample (``presentation_panel``) at out_dir/<category>/[<role>_]<defect_type>_<stem>.png; a clash
    gets a _1, _2, ... suffix."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    used: set[Path] = set()
    for sample in samples:
        stem = f"{_safe_name(sample.defect_type)}_{_safe_name(Path(sample.path).stem)}"
        if sample.role:
            stem = f"{_safe_name(sample.role)}_{stem}"
        folder = out_dir / _safe_name(sample.category)
        target, counter = folder / f"{stem}.png", 0
        while target in used:
            counter += 1
            target = folder / f"{stem}_{counter}.png"
        used.add(target)
        folder.mkdir(parents=True, exist_ok=True)
        panel = presentation_panel(sample, vmin, vmax, **render_options)
        if not cv2.imwrite(str(target), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write the map panel {target}")
        written.append(target)
    return written


def format_metric(value: float | None) -> str:
    """Percent with one decimal; NaN or missing as a dash."""
    if value is None or math.isnan(value):
        return MISSING_VALUE_TEXT
    return f"{100.0 * value:.1f}"


# Short column labels, so each view fits the 80 columns rich uses for a log file; the caption says what I-/P- mean.
SHORT_METRIC_LABELS = {"image_AUROC": "I-AUROC", "image_AP": "I-AP", "image_F1max": "I-F1max", "pixel_AUROC": "P-AUROC",
                       "pixel_AP": "P-AP", "pixel_AUPRO": "AUPRO", "pixel_sPRO": "sPRO"}
METRIC_LEGEND = "I- image-level, P- pixel-level; values ×100."


def _shown_rows(table: MetricsTable) -> list[tuple[RowKey, str]]:
    """(row key, subset label) of each row worth printing, in table order.

    No row repeats another: when a category (or the mean) has one subset besides "all" and its numbers equal
    the "all" row (every anomaly of the category is of that kind), the two are one row labelled with the
    subset; the mean rows are left out when there is one category (they would repeat it).
    """
    keys = table.ordered_keys()
    categories = {group for group, _ in keys if group != MEAN_GROUP}
    shown = []
    for group, subset in keys:
        if group == MEAN_GROUP and len(categories) < 2:
            continue
        subsets = [other for g, other in keys if g == group and other != ALL_SUBSET]
        folded = len(subsets) == 1 and (group, ALL_SUBSET) in table.rows and \
            _same_metrics(table.rows[(group, subsets[0])], table.rows[(group, ALL_SUBSET)])
        if folded and subset != ALL_SUBSET:
            continue
        shown.append(((group, subset), subsets[0] if folded else subset))
    return shown


def _same_metrics(first: dict[str, float], second: dict[str, float]) -> bool:
    return first.keys() == second.keys() and all(
        (math.isnan(value) and math.isnan(second[name])) or value == second[name] for name, value in first.items())


def print_results_table(table: MetricsTable, title: str, console: Console | None = None) -> list[Table]:
    """Print the results as two rich tables, image metrics then pixel metrics (one view each, so each fits 80
    columns): one row per (category, subset), then the bold mean rows; values ×100. A mean over fewer categories
    than the table has is marked * and the caption says which."""
    console = console or Console()
    coverage = table.mean_coverage()
    shown = _shown_rows(table)
    show_subset = any(label != ALL_SUBSET for _, label in shown)
    categories = len({group for group, _ in table.rows if group != MEAN_GROUP})
    names = table.metric_names()
    views = [("image", [n for n in names if n.startswith("image_")]),
             ("pixel", [n for n in names if not n.startswith("image_")])]
    printed = []
    for view, metric_names in views:
        if not metric_names:
            continue
        partial = [f"{subset} {SHORT_METRIC_LABELS.get(name, name)} {covered} of {total}"
                   for subset, per_metric in coverage.items() for name, (covered, total) in per_metric.items()
                   if name in metric_names and 0 < covered < total and (MEAN_GROUP, subset) in dict(shown)]
        caption = METRIC_LEGEND + (f" * a mean over fewer categories: {'; '.join(partial)}." if partial else "")
        rich_table = Table(title=f"{title}: {view}", caption=caption, caption_justify="left")
        rich_table.add_column("Category", overflow="fold")
        if show_subset:
            rich_table.add_column("Subset", overflow="fold")
        for name in metric_names:
            rich_table.add_column(SHORT_METRIC_LABELS.get(name, name), justify="right", no_wrap=True)
        previous_group = None
        for (group, subset), label in shown:
            if group == MEAN_GROUP and previous_group not in (None, MEAN_GROUP):
                rich_table.add_section()
            previous_group = group
            cells = [f"mean of {categories}" if group == MEAN_GROUP else group, *([label] if show_subset else [])]
            for name in metric_names:
                text = format_metric(table.rows[(group, subset)].get(name))
                covered, total = coverage.get(subset, {}).get(name, (0, 0)) if group == MEAN_GROUP else (0, 0)
                cells.append(text + ("*" if 0 < covered < total else ""))
            rich_table.add_row(*cells, style="bold" if group == MEAN_GROUP else None)
        console.print(rich_table)
        printed.append(rich_table)
    return printed


def image_curves(score_rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Per category, the image-level ROC (fpr, tpr) and precision-recall (recall, precision) curves of the test
    scores (torchmetrics). A category with one class or a non-finite score gets none."""
    import torch
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    curves = {}
    for category in sorted({str(row["category"]) for row in score_rows}):
        rows = [row for row in score_rows if str(row["category"]) == category]
        scores = torch.tensor([float(row["score"]) for row in rows], dtype=torch.float64)
        labels = torch.tensor([int(row["label"]) for row in rows])
        if len(set(labels.tolist())) < 2 or not bool(torch.isfinite(scores).all()):
            continue
        fpr, tpr, _ = binary_roc(scores, labels)  # sigmoid on scores outside [0, 1]: monotonic, same curve
        precision, recall, _ = binary_precision_recall_curve(scores, labels)
        curves[category] = {"roc": (fpr.tolist(), tpr.tolist()), "pr": (recall.tolist(), precision.tolist())}
    return curves


def write_curves_csv(path: str | Path, curves: Mapping[str, Mapping[str, tuple[list[float], list[float]]]]) -> None:
    """curves.csv: category, curve (roc: x = false-positive rate, y = true-positive rate; pr: x = recall,
    y = precision), x, y: what W&B's curve charts show, in the run folder."""
    with Path(path).open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["category", "curve", "x", "y"])
        for category, per_curve in curves.items():
            for name, (xs, ys) in per_curve.items():
                writer.writerows([category, name, repr(x), repr(y)] for x, y in zip(xs, ys))


def _wandb_loggers(logger: Any) -> list[Any]:
    """The WandbLoggers in `logger` (one logger, a sequence such as `trainer.loggers`, or None)."""
    if logger is None:
        return []
    from lightning.pytorch.loggers import WandbLogger  # imported late: Lightning is slow to import

    candidates = logger if isinstance(logger, (list, tuple)) else [logger]
    return [candidate for candidate in candidates if isinstance(candidate, WandbLogger)]


def _table_cell(value: Any) -> Any:
    """W&B writes NaN as a bare `NaN` token, which is not JSON; use None instead."""
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return None
    return value


def log_results_to_wandb(
    logger: Any,
    table: MetricsTable,
    score_rows: Sequence[Mapping[str, Any]],
    samples: Sequence[MapSample],
    vmin: float,
    vmax: float,
) -> None:
    """Log "test/per_category" and "test/scores" tables and the map panels under "test/maps/<category>".

    A no-op unless `logger` is (or contains) a Lightning WandbLogger. Everything goes into one
    `experiment.log` call without `step=`: test does not advance the global step, and W&B drops
    non-monotonic steps. The ground-truth mask is tiled across the three panels, so the interactive
    W&B overlay can be compared with the image and the heatmap alike.
    """
    loggers = _wandb_loggers(logger)
    if not loggers:
        return
    import wandb

    metric_names = table.metric_names()
    per_category = wandb.Table(
        columns=["group", "subset", *metric_names],
        data=[
            [
                group,
                subset,
                *(_table_cell(table.rows[(group, subset)].get(name, math.nan)) for name in metric_names),
            ]
            for group, subset in table.ordered_keys()
        ],
    )
    ordered_scores = sorted(score_rows, key=lambda row: (str(row["category"]), str(row["path"])))
    scores = wandb.Table(
        columns=list(SCORE_COLUMNS),
        data=[
            [
                str(row["path"]),
                str(row["category"]),
                str(row["defect_type"]),
                str(row["anomaly_kind"]),
                int(row["label"]),
                _table_cell(float(row["score"])),
                int(row["predicted_label"]),
            ]
            for row in ordered_scores
        ],
    )
    payload: dict[str, Any] = {"test/per_category": per_category, "test/scores": scores}
    curves = image_curves(score_rows)
    for name, title, x_name in (("roc", "image ROC", "false-positive rate"), ("pr", "image precision-recall", "recall")):
        if curves:
            payload[f"test/{name}_image"] = wandb.plot.line_series(
                xs=[curve[name][0] for curve in curves.values()], ys=[curve[name][1] for curve in curves.values()],
                keys=list(curves), title=title, xname=x_name)
    for sample in samples:
        panel = render_map_panel(sample, vmin, vmax, caption=False)
        height, width = panel.shape[0], panel.shape[1] // 3
        mask = _resized(_as_2d(sample.mask, "mask", sample.path), height, width, cv2.INTER_NEAREST) > 0.5
        image = wandb.Image(
            panel,
            masks={
                "ground_truth": {
                    "mask_data": np.tile(mask.astype(np.uint8), (1, 3)),
                    "class_labels": {1: "defect"},
                }
            },
            caption=f"{sample.role + ': ' if sample.role else ''}{caption_text(sample)} | label {sample.label} | "
                    f"{Path(sample.path).name}",
        )
        payload.setdefault(f"test/maps/{sample.category}", []).append(image)
    for wandb_logger in loggers:
        wandb_logger.experiment.log(payload)
