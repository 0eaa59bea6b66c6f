"""Evaluation of a test split, its own component: it consumes batch fields and writes the results.

A detector's test step hands ``TestEvaluation`` each batch with its anomaly maps and image scores; the batch's
own fields say the rest (``label``, ``mask``, ``has_mask``, ``index``, ``category``, ``path``, ``defect_type``,
``anomaly_kind``, and on LOCO-style data ``regions`` / ``region_saturation``), so nothing here reads the data
module. It owns the result store and its gather across processes, the metric table (per category, mean, and the
logical / structural split where the data has those kinds), the decision-threshold report, the choice of maps to
save (detections, misses, false alarms per category), the model timing, and the output files (metrics.json,
scores.csv, curves.csv, maps/, W&B).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics import Metric

from lightning_modules import metrics as M
from lightning_modules import reporting
from lightning_modules.distributed import gather_objects
from lightning_modules.progress import phase
from networks.anomaly_model import AnomalyModel


class NonFiniteResults(RuntimeError):
    """Maps or scores that are NaN or infinite: they must never turn into metrics or fitted statistics."""


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """What the tables say about a test image besides its numbers (from its batch fields)."""

    image_path: str
    category: str
    defect_type: str
    anomaly_kind: str


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


class TestEvaluation:
    """One test split's evaluation: ``start``, then ``update`` per batch (inside ``timed`` for the model's own
    time), then ``finish`` on every process (it gathers; only the global-zero process writes files).

    Args:
        threshold_fpr: the false-positive rate the decision threshold was fitted for (reported beside the test's).
        max_maps_per_category: test maps saved as images per category, a third each of detections, misses and
            false alarms (0: none).
    """

    # Why a test image is shown in maps/: (role, its label, whether the highest scores are kept, else the lowest).
    DISPLAY_ROLES = (("detected", 1, True), ("missed", 1, False), ("false alarm", 0, True))

    def __init__(self, threshold_fpr: float = 0.05, max_maps_per_category: int = 6) -> None:
        self.threshold_fpr = threshold_fpr
        self.max_maps_per_category = max_maps_per_category
        self.store = TestResultStore()
        self.start(torch.device("cpu"))

    def start(self, device: torch.device) -> None:
        self.device = device
        self.store.reset()
        self.facts: dict[int, ImageFacts] = {}
        self.display_candidates: dict[str, list[tuple[float, reporting.MapSample]]] = {}
        self.model_seconds = 0.0
        self.images_seen = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def timed(self, fn, *args):
        """``fn(*args)``, its time added to the model's (synchronised on GPU, so the figure is the model's own)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model_seconds += time.perf_counter() - start
        return result

    def update(self, batch: dict[str, Any], anomaly_map: Tensor, score: Tensor) -> None:
        """One batch (padding already dropped): B×H×W maps and B scores."""
        self.images_seen += anomaly_map.shape[0]
        self.store.update(batch["index"], score, batch["label"], anomaly_map, batch["mask"][:, 0], batch["has_mask"],
                          batch.get("regions"), batch.get("region_saturation"))
        for i, index in enumerate(batch["index"].tolist()):
            self.facts[index] = ImageFacts(str(batch["path"][i]), batch["category"][i], batch["defect_type"][i],
                                           batch["anomaly_kind"][i])
        self.keep_display_candidates(batch, anomaly_map, score)

    def keep_display_candidates(self, batch, anomaly_map: Tensor, score: Tensor) -> None:
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
                candidates = self.display_candidates.setdefault(f"{batch['category'][i]}/{role}", [])
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

    def gather_display_samples(self) -> list[reporting.MapSample]:
        local = gather_objects([s for cands in self.display_candidates.values() for _, s in cands])
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

    def speed_and_memory(self) -> dict[str, float]:
        seconds = max(self.model_seconds, 1e-9)
        info = {"model_throughput_img_per_s": self.images_seen / seconds, "device": str(self.device)}
        if self.device.type == "cuda":
            info["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        info["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return info

    def finish(self, model: AnomalyModel, run_info: dict[str, Any], output_dir: Path | None,
               loggers: list = ()) -> dict[str, Any]:
        """Gather, refuse non-finite results, compute the tables; write the files where ``output_dir`` is given
        (the global-zero process). Returns {"table", "scores", "run_info"}."""
        results = self.store.compute().tensors
        facts = {}
        for part in gather_objects(list(self.facts.items())):
            facts[part[0]] = part[1]
        count = int(results["scores"].numel())
        not_finite = ~(torch.isfinite(results["scores"]) & torch.isfinite(results["maps"]).flatten(1).all(dim=1))
        if bool(not_finite.any()):
            paths = [facts[i].image_path for i in results["indices"][not_finite].tolist()]
            raise NonFiniteResults(
                f"{len(paths)} of {count} test images have NaN or infinite anomaly maps or scores (e.g. "
                f"{', '.join(paths[:3])}); no metrics were computed from them. The training has probably diverged."
            )
        with_kinds = any(f.anomaly_kind in ("logical", "structural") for f in facts.values())
        with phase(f"computing the metrics of {count} test images"):
            table = compute_metrics_table(results, facts, with_kinds=with_kinds)
        predicted = model.predicted_label(results["scores"].to(model.image_threshold.device)).cpu()
        score_rows = score_table(results, facts, predicted)
        samples = self.gather_display_samples()
        vmin, vmax = display_range(results["maps"])
        info = {**run_info, **self.speed_and_memory(), "test_images": count,
                "decision_threshold": threshold_report(results, facts, predicted, model, self.threshold_fpr)}
        if output_dir is not None:
            reporting.write_metrics_json(output_dir / "metrics.json", table, info)
            reporting.write_scores_csv(output_dir / "scores.csv", score_rows)
            reporting.write_curves_csv(output_dir / "curves.csv", reporting.image_curves(score_rows))
            reporting.save_map_panels(output_dir / "maps", samples, vmin, vmax)
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    reporting.log_results_to_wandb(logger, table, score_rows, samples, vmin, vmax)
        self.store.reset()
        return {"table": table, "scores": score_rows, "run_info": info}


# ---------------------------------------------------------------------- result tables
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


def compute_metrics_table(results: dict[str, Tensor], records: dict[int, ImageFacts], with_kinds: bool) -> reporting.MetricsTable:
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
