"""Metrics against independent references (sklearn, per-threshold loops, hand-computed curves) and
DDP correctness (merged states and a real two-process gloo run)."""

import bisect
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from lightning_modules.metrics import AUPRO, AUROC, SPRO, AveragePrecision, F1Max

TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# references (float64 numpy, one threshold at a time)
# ---------------------------------------------------------------------------------------------


def reference_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_pos = np.sum(predicted & (labels == 1))
        false_pos = np.sum(predicted & (labels == 0))
        false_neg = np.sum(~predicted & (labels == 1))
        best = max(best, 2 * true_pos / (2 * true_pos + false_pos + false_neg))
    return best


def reference_truncated_area(fpr: np.ndarray, overlap: np.ndarray, fpr_limit: float) -> float:
    """The MVTec AD evaluation code's ``trapezoid(x, y, x_max)``, divided by ``x_max``."""
    correction = 0.0
    if fpr_limit not in fpr:
        ins = bisect.bisect(fpr, fpr_limit)
        y_interp = overlap[ins - 1] + (overlap[ins] - overlap[ins - 1]) * (fpr_limit - fpr[ins - 1]) / (
            fpr[ins] - fpr[ins - 1]
        )
        correction = 0.5 * (y_interp + overlap[ins - 1]) * (fpr_limit - fpr[ins - 1])
    keep = fpr <= fpr_limit
    x, y = fpr[keep], overlap[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


def reference_overlap_area(normal_scores, region_scores, saturations, fpr_limit) -> float:
    """Loop over every distinct threshold: FPR over normal pixels, mean of min(hits / s_r, 1)."""
    all_scores = np.concatenate([normal_scores, *region_scores])
    fpr, overlap = [0.0], [0.0]
    for threshold in np.unique(all_scores)[::-1]:
        fpr.append(np.mean(normal_scores >= threshold))
        overlap.append(
            np.mean([min(np.sum(r >= threshold) / s, 1.0) for r, s in zip(region_scores, saturations)])
        )
    return reference_truncated_area(np.array(fpr), np.array(overlap), fpr_limit)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float, structure) -> float:
    normal_scores = maps[masks == 0]
    region_scores = []
    for image_map, mask in zip(maps, masks):
        labels, count = ndimage.label(mask, structure=structure)
        region_scores += [image_map[labels == k] for k in range(1, count + 1)]
    areas = [len(r) for r in region_scores]
    return reference_overlap_area(normal_scores, region_scores, areas, fpr_limit)


def reference_spro(maps, regions, saturation, is_normal, fpr_limit) -> float:
    normal_scores = maps[is_normal].ravel()
    region_scores, saturations = [], []
    for image_map, image_regions, image_saturation in zip(maps, regions, saturation):
        for region, sat in zip(image_regions, image_saturation):
            if sat > 0 and region.any():
                region_scores.append(image_map[region > 0])
                saturations.append(min(sat, region.sum()))
    return reference_overlap_area(normal_scores, region_scores, saturations, fpr_limit)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def random_scores_with_ties(seed: int, count: int = 300):
    rng = np.random.default_rng(seed)
    labels = (rng.random(count) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(size=count) + 1.2 * labels, 1)  # one decimal: many ties
    return scores, labels


def blob_maps(seed: int, count: int = 8, size: int = 24):
    """Maps and masks of ``count`` images: the first two normal, the others with 2-3 blobs."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for index in range(2, count):
        for _ in range(rng.integers(2, 4)):
            cy, cx, radius = rng.integers(3, size - 3), rng.integers(3, size - 3), rng.uniform(1.0, 4.0)
            masks[index][(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    maps = np.round(rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape), 2).astype(np.float32)
    return maps, masks


def loco_regions(seed: int):
    """5 images 20×20: two normal, three with up to 3 (overlapping) regions; K padded to 3."""
    rng = np.random.default_rng(seed)
    count, num_slots, size = 5, 3, 20
    is_normal = np.array([True, False, True, False, False])
    regions = np.zeros((count, num_slots, size, size), dtype=np.uint8)
    saturation = np.zeros((count, num_slots), dtype=np.float32)
    regions[1, 0, 2:8, 2:10] = 1  # area 48, saturation below the area (fractional)
    saturation[1, 0] = 17.5
    regions[1, 1, 5:12, 6:14] = 1  # overlaps region 0; saturation above the area: capped at 56
    saturation[1, 1] = 500.0
    regions[3, 0, 10:18, 3:7] = 1  # area 32, saturated at its area
    saturation[3, 0] = 32.0
    regions[4, 0, 0:5, 0:5] = 1
    saturation[4, 0] = 4.25
    regions[4, 1, 12:19, 12:19] = 1
    saturation[4, 1] = 20.0
    regions[4, 2, 3:6, 14:17] = 1  # padding slot with pixels but saturation 0: ignored
    union = regions.max(axis=1).astype(np.float32)
    maps = np.round(rng.random((count, size, size)) + 0.5 * union * rng.random((count, size, size)), 2)
    return maps.astype(np.float32), regions, saturation, is_normal


def torch_of(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# ---------------------------------------------------------------------------------------------
# image and pixel AUROC / AP / F1-max
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_image_metrics_match_sklearn_and_brute_force(seed):
    scores, labels = random_scores_with_ties(seed)
    metrics = {"auroc": AUROC(), "ap": AveragePrecision(), "f1": F1Max()}
    for start in range(0, len(scores), 64):  # batched updates, like an evaluation loop
        batch_scores, batch_labels = torch_of(scores[start : start + 64], labels[start : start + 64])
        for metric in metrics.values():
            metric.update(batch_scores, batch_labels)
    assert abs(metrics["auroc"].compute().item() - roc_auc_score(labels, scores)) < TOLERANCE
    assert abs(metrics["ap"].compute().item() - average_precision_score(labels, scores)) < TOLERANCE
    assert abs(metrics["f1"].compute().item() - reference_f1_max(scores, labels)) < TOLERANCE


def test_large_scores_are_not_squashed_by_a_sigmoid():
    # torchmetrics applies a sigmoid to scores outside [0, 1]; in float32 every score above ~17
    # becomes 1.0 and all ties. Distances such as these must still rank exactly.
    scores, labels = random_scores_with_ties(2)
    scores = 1000.0 + 10.0 * scores
    auroc = AUROC()
    auroc.update(*torch_of(scores, labels))
    assert abs(auroc.compute().item() - roc_auc_score(labels, scores)) < TOLERANCE
    assert roc_auc_score(labels, scores) > 0.7


def test_pixel_metrics_on_flattened_maps_match_sklearn():
    maps, masks = blob_maps(3)
    auroc, ap = AUROC(), AveragePrecision()
    maps_t, masks_t = torch_of(maps[:, None], masks[:, None])  # N×1×H×W float masks, as the dataset gives
    for metric in (auroc, ap):
        metric.update(maps_t[:5], masks_t[:5])
        metric.update(maps_t[5:], masks_t[5:])
    assert abs(auroc.compute().item() - roc_auc_score(masks.ravel(), maps.ravel())) < TOLERANCE
    assert abs(ap.compute().item() - average_precision_score(masks.ravel(), maps.ravel())) < TOLERANCE
    assert auroc.preds[-1].dtype == torch.float32 and auroc.target[-1].dtype == torch.uint8


def test_bf16_scores_are_stored_and_ranked_in_float32():
    maps, masks = blob_maps(4)
    maps_bf16 = torch.from_numpy(maps).to(torch.bfloat16)
    rounded = maps_bf16.float().numpy()
    auroc, aupro = AUROC(), AUPRO()
    auroc.update(maps_bf16, torch.from_numpy(masks))
    aupro.update(maps_bf16, torch.from_numpy(masks))
    assert auroc.preds[-1].dtype == torch.float32 and aupro.normal_scores[-1].dtype == torch.float32
    assert abs(auroc.compute().item() - roc_auc_score(masks.ravel(), rounded.ravel())) < TOLERANCE
    expected = reference_aupro(rounded, masks, 0.3, np.ones((3, 3)))
    assert abs(aupro.compute().item() - expected) < TOLERANCE


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        AUROC().update(torch.rand(4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        AUPRO().update(torch.rand(2, 8, 8), torch.zeros(2, 8, 9))


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_per_threshold_reference(seed, fpr_limit):
    maps, masks = blob_maps(seed)
    metric = AUPRO(fpr_limit=fpr_limit)
    maps_t, masks_t = torch_of(maps, masks)
    metric.update(maps_t[:3], masks_t[:3])
    metric.update(maps_t[3:], masks_t[3:])
    expected = reference_aupro(maps.astype(np.float64), masks, fpr_limit, np.ones((3, 3)))
    assert abs(metric.compute().item() - expected) < TOLERANCE


def test_aupro_with_four_connectivity_matches_scipy_default_structure():
    maps, masks = blob_maps(7)
    metric = AUPRO(connectivity=4)
    metric.update(*torch_of(maps, masks))
    expected = reference_aupro(maps.astype(np.float64), masks, 0.3, None)
    assert abs(metric.compute().item() - expected) < TOLERANCE


def test_aupro_connectivity_decides_regions_hand_computed():
    # A 2-pixel bar and a pixel touching it diagonally. The bar scores 1, everything else 0.
    # 8-connected: one region of 3, PRO jumps to 2/3 at FPR 0; 4-connected: regions of 2 and 1,
    # PRO jumps to (1 + 0) / 2. Then a straight line to (1, 1): AUPRO_0.3 = p + 0.15 (1 - p).
    mask = torch.zeros(1, 6, 6)
    mask[0, 0, 0:2] = 1
    mask[0, 1, 2] = 1
    anomaly_map = torch.zeros(1, 6, 6)
    anomaly_map[0, 0, 0:2] = 1
    for connectivity, pro_at_top in ((8, 2 / 3), (4, 0.5)):
        metric = AUPRO(connectivity=connectivity)
        metric.update(anomaly_map, mask)
        assert metric.compute().item() == pytest.approx(pro_at_top + 0.15 * (1 - pro_at_top), abs=1e-6)


def test_aupro_hand_computed_cases():
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, 2:6, 3:8] = 1
    masks[1, 0, 9:12, 9:11] = 1
    masks[1, 0, 0:2, 0:2] = 1

    perfect = AUPRO()
    perfect.update(masks.clone(), masks)
    assert perfect.compute().item() == pytest.approx(1.0, abs=1e-6)

    # One tie block: the curve is the straight line (0,0)-(1,1); area to 0.3 is 0.3²/2 → 0.15.
    constant = AUPRO()
    constant.update(torch.full_like(masks, 0.7), masks)
    assert constant.compute().item() == pytest.approx(0.15, abs=1e-6)

    # Every normal pixel outranks every region pixel: PRO stays 0 until FPR 1.
    inverted = AUPRO()
    inverted.update(1 - masks, masks)
    assert inverted.compute().item() == pytest.approx(0.0, abs=1e-6)


def test_aupro_hand_computed_interpolation():
    # Region A (4 px) scores 0.9, region B (2 px) 0.1, one of the 10 normal pixels 0.8, the rest 0.
    # Curve: (0, .5) at t=.9, (.1, .5) at t=.8, (.1, 1) at t=.1, (1, 1) at t=0.
    # Area to 0.3: .1 × .5 + .2 × 1 = .25 → AUPRO = .25 / .3.
    mask = torch.zeros(1, 4, 4)
    anomaly_map = torch.zeros(1, 4, 4)
    mask[0, 0:2, 0:2] = 1
    anomaly_map[0, 0:2, 0:2] = 0.9
    mask[0, 3, 2:4] = 1
    anomaly_map[0, 3, 2:4] = 0.1
    anomaly_map[0, 0, 3] = 0.8
    metric = AUPRO()
    metric.update(anomaly_map, mask)
    assert metric.compute().item() == pytest.approx(0.25 / 0.3, abs=1e-6)


def test_aupro_equals_pixel_auroc_when_regions_have_equal_area_and_limit_is_one():
    # With equal areas the PRO is the pixel TPR, so the full-range AUPRO is the pixel AUROC.
    rng = np.random.default_rng(8)
    masks = np.zeros((4, 20, 20), dtype=np.float32)
    masks[1, 2:5, 2:5] = masks[1, 10:13, 12:15] = masks[2, 6:9, 6:9] = masks[3, 15:18, 1:4] = 1
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(np.float32)
    metric = AUPRO(fpr_limit=1.0)
    metric.update(*torch_of(maps, masks))
    assert abs(metric.compute().item() - roc_auc_score(masks.ravel(), maps.ravel())) < TOLERANCE


def test_aupro_without_regions_is_nan():
    metric = AUPRO()
    metric.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    assert torch.isnan(metric.compute())


def test_aupro_reset_forgets_previous_data():
    maps, masks = blob_maps(9)
    metric = AUPRO()
    metric.update(*torch_of(1 - maps, masks))
    metric.compute()
    metric.reset()
    metric.update(*torch_of(maps, masks))
    expected = reference_aupro(maps.astype(np.float64), masks, 0.3, np.ones((3, 3)))
    assert abs(metric.compute().item() - expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# sPRO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_spro_matches_per_threshold_reference(fpr_limit):
    maps, regions, saturation, is_normal = loco_regions(10)
    metric = SPRO(fpr_limit=fpr_limit)
    tensors = torch_of(maps, regions, saturation, is_normal)
    metric.update(*[t[:2] for t in tensors])
    metric.update(*[t[2:] for t in tensors])
    expected = reference_spro(
        maps.astype(np.float64), regions, saturation.astype(np.float64), is_normal, fpr_limit
    )
    assert abs(metric.compute().item() - expected) < TOLERANCE
    assert metric.num_regions.item() == 5


def test_spro_saturates_when_half_of_a_region_is_detected():
    # A region of 8 pixels with saturation 4: the 4 pixels scoring 1 already give sPRO 1 at FPR 0.
    maps = torch.zeros(2, 1, 6, 6)
    regions = torch.zeros(2, 1, 6, 6, dtype=torch.uint8)
    regions[1, 0, 1:3, 1:5] = 1
    maps[1, 0, 1, 1:5] = 1.0
    is_normal = torch.tensor([True, False])
    halved = SPRO()
    halved.update(maps, regions, torch.tensor([[0.0], [4.0]]), is_normal)
    assert halved.compute().item() == pytest.approx(1.0, abs=1e-6)
    # Saturation at the full area is the plain overlap: 0.5 at FPR 0, then the line to (1, 1).
    full = SPRO()
    full.update(maps, regions, torch.tensor([[0.0], [8.0]]), is_normal)
    assert full.compute().item() == pytest.approx(0.5 + 0.025 * 0.5, abs=1e-6)


def test_spro_fractional_saturation_hand_computed():
    # Saturation 2.5 on an 8-pixel region: 2 pixels at 1.0 give 0.8, a third at 0.5 gives
    # min(3 / 2.5, 1) = 1. One of the 10 normal pixels scores 0.7.
    # Curve: (0, .8), (.1, .8), (.1, 1), (1, 1); area to 0.3 = .1 × .8 + .2 × 1 = .28.
    maps = torch.zeros(2, 2, 5)
    regions = torch.zeros(2, 1, 2, 5, dtype=torch.uint8)
    regions[1, 0, :, 0:4] = 1
    maps[1, 0, 0:2] = 1.0
    maps[1, 1, 0] = 0.5
    maps[0, 0, 0] = 0.7
    saturation = torch.tensor([[0.0], [2.5]])
    is_normal = torch.tensor([True, False])
    metric = SPRO(fpr_limit=0.3)
    metric.update(maps, regions, saturation, is_normal)
    assert metric.compute().item() == pytest.approx(0.28 / 0.3, abs=1e-6)
    at_five_percent = SPRO()
    at_five_percent.update(maps, regions, saturation, is_normal)
    assert at_five_percent.compute().item() == pytest.approx(0.8, abs=1e-6)


def test_spro_fpr_counts_normal_images_only():
    maps, regions, saturation, is_normal = loco_regions(11)
    baseline = SPRO()
    baseline.update(*torch_of(maps, regions, saturation, is_normal))
    # Very high scores outside the regions of anomalous images change nothing ...
    hot_background = maps.copy()
    outside = (regions.max(axis=1) == 0) & ~is_normal[:, None, None]
    hot_background[outside] = 50.0
    shifted = SPRO()
    shifted.update(*torch_of(hot_background, regions, saturation, is_normal))
    assert shifted.compute().item() == pytest.approx(baseline.compute().item(), abs=1e-7)
    # ... while the same on a normal image drives the curve down.
    hot_normal = maps.copy()
    hot_normal[0] = 50.0
    worse = SPRO(fpr_limit=0.3)
    worse.update(*torch_of(hot_normal, regions, saturation, is_normal))
    expected = reference_spro(
        hot_normal.astype(np.float64), regions, saturation.astype(np.float64), is_normal, 0.3
    )
    assert abs(worse.compute().item() - expected) < TOLERANCE
    assert expected == pytest.approx(0.0, abs=1e-9)  # half the normal pixels outrank every region pixel


def test_spro_rejects_regions_on_normal_images():
    maps, regions, saturation, is_normal = loco_regions(12)
    is_normal[1] = True
    with pytest.raises(ValueError, match="marked normal"):
        SPRO().update(*torch_of(maps, regions, saturation, is_normal))


def test_spro_without_regions_is_nan():
    metric = SPRO()
    metric.update(
        torch.rand(2, 8, 8),
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 1),
        torch.tensor([True, True]),
    )
    assert torch.isnan(metric.compute())


# ---------------------------------------------------------------------------------------------
# DDP: merged states and a real two-process run
# ---------------------------------------------------------------------------------------------


def all_metrics_and_batches():
    """(metric factory, batch of update arguments) for every metric, on shared seeded data."""
    scores, labels = random_scores_with_ties(13, count=101)
    maps, masks = blob_maps(14, count=7)
    loco = loco_regions(15)
    return [
        (AUROC, torch_of(scores, labels)),
        (AveragePrecision, torch_of(maps[:, None], masks[:, None])),
        (F1Max, torch_of(scores, labels)),
        (AUPRO, torch_of(maps, masks)),
        (SPRO, torch_of(*loco)),
    ]


def single_process_values():
    values = []
    for factory, batch in all_metrics_and_batches():
        metric = factory()
        metric.update(*batch)
        values.append(metric.compute().item())
    return values


def test_merged_half_states_equal_one_instance_on_all_data():
    expected = single_process_values()
    for (factory, batch), value in zip(all_metrics_and_batches(), expected):
        half = len(batch[0]) // 2 + 1  # uneven halves
        first, second = factory(), factory()
        first.update(*[t[:half] for t in batch])
        second.update(*[t[half:] for t in batch])
        first.merge_state(second)
        assert first.compute().item() == pytest.approx(value, abs=1e-6), factory.__name__


def _distributed_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)  # first, before any op: forked children must not reuse the parent's thread pool
    warnings.filterwarnings("ignore", message=".*was called before the ``update``")  # the empty rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    values = []
    for index, (factory, batch) in enumerate(all_metrics_and_batches()):
        metric = factory()
        count = len(batch[0])
        # Uneven shards; for AUROC and AUPRO rank 1 sees nothing at all (a category on one rank).
        cut = count if index in (0, 3) else count // 2 + 1
        shard = slice(0, cut) if rank == 0 else slice(cut, count)
        if shard.stop > shard.start:
            metric.update(*[t[shard] for t in batch])
        values.append(metric.compute().item())  # compute() gathers the states of both ranks
    torch.save(values, f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run_gives_single_process_values(tmp_path):
    # fork reuses this process's imports (spawn re-imports torch, scipy and sklearn: ~20 s on 2 cores)
    mp.start_processes(
        _distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    expected = single_process_values()
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt")
        assert values == pytest.approx(expected, abs=1e-6), f"rank {rank}"
