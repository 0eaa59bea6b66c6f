"""Evaluation metrics as torchmetrics ``Metric``s: AUROC, AP, F1-max, AUPRO and sPRO.

Image and pixel metrics use the same classes: pass image scores (B) and labels (B), or anomaly maps
(B×1×H×W) and masks (B×1×H×W); everything is flattened on update.

Why these are ``Metric``s with 1-D "cat" list states: under DDP torchmetrics gathers every rank's
states (padding uneven sizes) before ``compute``, so two processes give exactly the numbers of one.
Every state is 1-D and always holds one typed empty tensor, so a rank that saw no image of a
category still gathers a tensor of the right dtype and rank (torchmetrics would substitute a
float32 vector, which breaks the gather of integer states and of N×H×W states).

Scores are cast to float32 (or ``score_dtype``) on update, so bf16 maps are ranked in full
precision from then on, and are never squashed by torchmetrics' automatic sigmoid (which makes
all scores above ~17 tie at 1.0 in float32).

Memory (per metric instance, i.e. per category; P = test pixels, e.g. 160 images at 256 px ≈
10.5 M; all of MVTec AD at 256 px ≈ 110 M):
- pixel AUROC / AP: 5 bytes per pixel stored (float32 score + uint8 label), about 35 bytes per
  pixel at the peak of ``compute`` (argsort indices, sorted copies, cumulative sums): ~0.4 GB for
  10 M pixels, ~4 GB if all of MVTec AD went into one instance.
- AUPRO / sPRO: 4 bytes per normal pixel plus 12 bytes per region pixel stored; ``compute`` sorts
  only the pixels scoring above the FPR limit's cut-off (≈ fpr_limit of the normal pixels plus
  the region pixels), at about 40 bytes each.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve
from torchmetrics.utilities import dim_zero_cat

__all__ = ["AUPRO", "AUROC", "SPRO", "AveragePrecision", "F1Max"]


class _TypedCatStates(Metric):
    """Keeps a typed empty tensor in every list state so empty ranks gather the right dtype."""

    def _declare_cat_states(self, dtypes: dict[str, torch.dtype]) -> None:
        self._cat_state_dtypes = dict(dtypes)
        self._seed_cat_states()

    def _seed_cat_states(self) -> None:
        for name, dtype in self._cat_state_dtypes.items():
            getattr(self, name).append(torch.empty(0, dtype=dtype, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._seed_cat_states()


def _flat_scores_and_labels(preds: Tensor, target: Tensor, score_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if preds.shape != target.shape:
        raise ValueError(
            f"scores and labels must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    scores = preds.detach().flatten().to(score_dtype)
    labels = (target.detach().flatten() > 0.5).to(torch.uint8)  # masks may be float {0, 1}
    return scores, labels


class _ExactBinaryCurve(_TypedCatStates):
    """Shared set-up of the torchmetrics binary curve metrics: every score kept (no binning), no
    sigmoid on scores outside [0, 1], typed cat states, and inputs flattened (image scores or maps)."""

    def __init__(self, score_dtype: torch.dtype = torch.float32, **kwargs) -> None:
        super().__init__(thresholds=None, validate_args=False, normalization=None, **kwargs)
        self.score_dtype = score_dtype
        self._declare_cat_states({"preds": score_dtype, "target": torch.uint8})

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(*_flat_scores_and_labels(preds, target, self.score_dtype))


class AUROC(_ExactBinaryCurve, BinaryAUROC):
    """Area under the ROC curve over all scores (no binning); image scores or flattened maps."""


class AveragePrecision(_ExactBinaryCurve, BinaryAveragePrecision):
    """Average precision (area under the step PR curve, as sklearn) over all scores, no binning."""


class F1Max(_ExactBinaryCurve, BinaryPrecisionRecallCurve):
    """Best F1 over every threshold of the precision-recall curve (threshold-free F1)."""

    higher_is_better = True

    def compute(self) -> Tensor:  # type: ignore[override]
        precision, recall, _ = super().compute()
        f1 = 2 * precision * recall / (precision + recall)
        return torch.nan_to_num(f1, nan=0.0).max()


def _as_maps(maps: Tensor, name: str) -> Tensor:
    """N×H×W view of N×H×W or N×1×H×W input."""
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"{name} must be N×H×W or N×1×H×W, got shape {tuple(maps.shape)}")
    return maps.detach()


def _truncated_trapezoid(fpr: Tensor, overlap: Tensor, fpr_limit: float) -> Tensor:
    """Trapezoid area under a curve with non-decreasing ``fpr``, cut at ``fpr_limit``.

    The curve is interpolated linearly between the last point at or below the limit and the next
    one, as the MVTec AD evaluation code (``generic_util.trapezoid``) does.
    """
    limit = torch.tensor([fpr_limit], dtype=fpr.dtype, device=fpr.device)
    last = int(torch.searchsorted(fpr, limit, right=True)) - 1
    x, y = fpr[: last + 1], overlap[: last + 1]
    if x[-1] < fpr_limit and last + 1 < fpr.numel():
        x_next, y_next = fpr[last + 1], overlap[last + 1]
        y_limit = y[-1] + (y_next - y[-1]) * (fpr_limit - x[-1]) / (x_next - x[-1])
        x, y = torch.cat([x, limit]), torch.cat([y, y_limit.reshape(1)])
    return torch.trapezoid(y, x)


def _area_under_overlap_curve(
    normal_scores: Tensor, region_scores: Tensor, region_weights: Tensor, num_regions: int, fpr_limit: float
) -> Tensor:
    """Normalised area under the (s)PRO-over-FPR curve, exact over every distinct threshold.

    At threshold t, FPR(t) = share of normal pixels scoring >= t, and the overlap is the sum of the
    weights of region pixels scoring >= t divided by the number of regions. One descending sort and
    two cumulative sums give the curve at every threshold; it is read only at the end of each block
    of tied scores. Written by hand because the library ROC curves treat every pixel alike and
    cannot average per region.
    """
    num_normal = normal_scores.numel()
    if num_regions == 0 or num_normal == 0:
        return torch.tensor(float("nan"))
    if torch.isnan(normal_scores).any() or torch.isnan(region_scores).any():
        raise ValueError("anomaly maps contain NaN; AUPRO/sPRO cannot rank them")
    # Only pixels down to the score at which the FPR passes the limit shape the truncated curve:
    # keep the top k normal scores (k/num_normal > fpr_limit) and every pixel tied with or above.
    k = min(num_normal, math.floor(fpr_limit * num_normal) + 2)
    cutoff = torch.kthvalue(normal_scores, num_normal - k + 1).values
    keep_normal, keep_region = normal_scores >= cutoff, region_scores >= cutoff
    kept_normal = int(keep_normal.sum())
    scores = torch.cat([normal_scores[keep_normal], region_scores[keep_region]])
    is_normal = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    is_normal[:kept_normal] = True
    weights = torch.cat(
        [
            torch.zeros(kept_normal, dtype=torch.float64, device=scores.device),
            region_weights[keep_region].to(torch.float64),
        ]
    )
    order = torch.argsort(scores, descending=True)
    scores = scores[order]
    false_positives = torch.cumsum(is_normal[order], dim=0)
    overlap = torch.cumsum(weights[order], dim=0) / num_regions
    block_end = torch.ones_like(scores, dtype=torch.bool)
    block_end[:-1] = scores[1:] != scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    fpr = torch.cat([zero, false_positives[block_end].to(torch.float64) / num_normal])
    overlap = torch.cat([zero, overlap[block_end].clamp(max=1.0)])  # cumsum rounding must not pass 1
    return _truncated_trapezoid(fpr, overlap, fpr_limit) / fpr_limit


class _OverlapCurveMetric(_TypedCatStates):
    """States shared by AUPRO and sPRO: normal-pixel scores, region-pixel scores and weights."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit = fpr_limit
        self.add_state("normal_scores", default=[], dist_reduce_fx="cat")
        self.add_state("region_scores", default=[], dist_reduce_fx="cat")
        self.add_state("region_weights", default=[], dist_reduce_fx="cat")
        self.add_state("num_regions", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self._declare_cat_states(
            {"normal_scores": torch.float32, "region_scores": torch.float32, "region_weights": torch.float64}
        )

    def compute(self) -> Tensor:
        area = _area_under_overlap_curve(
            dim_zero_cat(self.normal_scores),
            dim_zero_cat(self.region_scores),
            dim_zero_cat(self.region_weights),
            int(self.num_regions),
            self.fpr_limit,
        )
        return area.to(torch.float32)


class AUPRO(_OverlapCurveMetric):
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD).

    Regions are the connected components of each ground-truth mask. ``connectivity=8`` follows the
    MVTec AD evaluation code (``scipy.ndimage.label`` with ``structure=np.ones((3, 3))``) and
    anomalib (OpenCV/kornia, 8-connected); ``connectivity=4`` gives scipy's default structure.
    FPR counts the mask==0 pixels of all images. Components are labelled on update (CPU, ~1 ms per
    256² mask), so only 1-D states are kept. Returns nan when no image has an anomalous region.
    """

    def __init__(self, fpr_limit: float = 0.3, connectivity: int = 8, **kwargs) -> None:
        super().__init__(fpr_limit, **kwargs)
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        self.connectivity = connectivity

    def update(self, anomaly_maps: Tensor, masks: Tensor) -> None:
        """``anomaly_maps`` and ``masks``: N×H×W or N×1×H×W; mask pixels > 0.5 are anomalous."""
        maps, masks = _as_maps(anomaly_maps, "anomaly_maps"), _as_maps(masks, "masks")
        if maps.shape != masks.shape:
            raise ValueError(
                f"anomaly_maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape"
            )
        maps, anomalous = maps.to(torch.float32), masks > 0.5
        self.normal_scores.append(maps[~anomalous])
        self.region_scores.append(maps[anomalous])
        # No connectivity across the image axis: one call labels every image of the batch.
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1 if self.connectivity == 4 else 2)
        anomalous_np = anomalous.cpu().numpy()
        labels, num_regions = ndimage.label(anomalous_np, structure=structure)
        # Area of each anomalous pixel's component, in the row-major order of maps[anomalous].
        region_area = np.bincount(labels.ravel())[labels[anomalous_np]]
        self.region_weights.append(torch.from_numpy(1.0 / region_area).to(maps.device))
        self.num_regions += num_regions


class SPRO(_OverlapCurveMetric):
    """Area under the saturated-PRO curve up to ``fpr_limit``, divided by it (MVTec LOCO AD).

    sPRO(t) = mean over regions r of min(|{p in r: score(p) >= t}| / s_r, 1), with s_r the region's
    saturation in pixels (capped at its area, as the LOCO code caps absolute thresholds); FPR(t)
    counts the pixels of normal images only. Regions may overlap: a pixel counts for each region.
    Returns nan when there is no region.
    """

    def __init__(self, fpr_limit: float = 0.05, **kwargs) -> None:
        super().__init__(fpr_limit, **kwargs)

    def update(
        self, anomaly_maps: Tensor, regions: Tensor, region_saturation: Tensor, is_normal: Tensor
    ) -> None:
        """``anomaly_maps`` N×H×W (or N×1×H×W); ``regions`` N×K×H×W, one binary mask per defect region;
        ``region_saturation`` N×K pixels (0 marks padding); ``is_normal`` N bool."""
        maps = _as_maps(anomaly_maps, "anomaly_maps").to(torch.float32)
        n, h, w = maps.shape
        if regions.ndim != 4 or regions.shape[0] != n or regions.shape[2:] != (h, w):
            raise ValueError(
                f"regions must be N×K×H×W matching anomaly_maps {(n, h, w)}, got {tuple(regions.shape)}"
            )
        if region_saturation.shape != regions.shape[:2]:
            raise ValueError(
                f"region_saturation must be N×K = {tuple(regions.shape[:2])}, "
                f"got {tuple(region_saturation.shape)}"
            )
        is_normal = is_normal.to(device=maps.device, dtype=torch.bool).reshape(n)
        region_masks = regions.detach().to(maps.device) != 0
        if region_masks[is_normal].any():
            raise ValueError("an image marked normal has a non-empty defect region")
        self.normal_scores.append(maps[is_normal].flatten())

        saturation = region_saturation.detach().to(device=maps.device, dtype=torch.float64)
        area = region_masks.flatten(2).sum(-1)
        valid = (saturation > 0) & (area > 0)  # zero saturation is padding; empty masks have no pixels
        saturation = torch.minimum(saturation, area.to(torch.float64))
        image_idx, region_idx, ys, xs = torch.nonzero(region_masks & valid[..., None, None], as_tuple=True)
        scores = maps[image_idx, ys, xs]
        # Rank every pixel inside its region by descending score: a stable sort by score, then a
        # stable sort by region keeps each region's pixels in score order.
        region_id = image_idx * regions.shape[1] + region_idx
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(region_id[order], stable=True)]
        scores, region_id = scores[order], region_id[order]
        pixel_saturation = saturation[image_idx, region_idx][order]
        _, region_sizes = torch.unique_consecutive(region_id, return_counts=True)
        region_start = torch.repeat_interleave(torch.cumsum(region_sizes, 0) - region_sizes, region_sizes)
        rank = (torch.arange(scores.numel(), device=maps.device) - region_start + 1).to(torch.float64)
        # The j-th best pixel of region r adds (min(j, s_r) - min(j - 1, s_r)) / s_r: 1/s_r while the
        # count is below s_r, the remainder for a fractional s_r, then nothing.
        gain = (
            torch.minimum(rank, pixel_saturation) - torch.minimum(rank - 1, pixel_saturation)
        ) / pixel_saturation
        self.region_scores.append(scores)
        self.region_weights.append(gain)
        self.num_regions += int(valid.sum())


# ---------------------------------------------------------------------- one-shot helpers
# The evaluation path gathers every test result first (lightning_modules.base.TestResultStore), then
# scores each (category, subset) slice once; these wrap the Metric classes for that use, so the
# definitions live in one place.


def _once(metric: Metric, *args: Tensor) -> Tensor:
    metric.update(*args)
    return metric.compute()


def image_auroc(scores: Tensor, labels: Tensor) -> Tensor:
    return _once(AUROC(sync_on_compute=False), scores, labels)


def image_ap(scores: Tensor, labels: Tensor) -> Tensor:
    return _once(AveragePrecision(sync_on_compute=False), scores, labels)


def image_f1max(scores: Tensor, labels: Tensor) -> Tensor:
    return _once(F1Max(sync_on_compute=False), scores, labels)


def pixel_auroc(maps: Tensor, masks: Tensor) -> Tensor:
    return _once(AUROC(sync_on_compute=False), maps, masks)


def pixel_ap(maps: Tensor, masks: Tensor) -> Tensor:
    return _once(AveragePrecision(sync_on_compute=False), maps, masks)


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> Tensor:
    return _once(AUPRO(fpr_limit=fpr_limit, sync_on_compute=False), maps, masks)


def spro(maps: Tensor, regions: Tensor, saturation: Tensor, is_normal: Tensor, fpr_limit: float = 0.05) -> Tensor:
    return _once(SPRO(fpr_limit=fpr_limit, sync_on_compute=False), maps, regions, saturation, is_normal)
