"""Time and peak memory of the evaluation metrics on N synthetic S×S anomaly maps.

    python bench/metric_speed.py [--images 100] [--size 256] [--batch-size 32] [--device cpu] [--json out.json]

Half the images (``--anomalous-fraction``) carry 1-3 elliptical blobs as ground truth; the maps are
blurred noise plus a raised, blurred copy of the blobs, so every metric has a non-trivial value to
compute. Each metric of ``lightning_modules.metrics`` gets a fresh instance, is updated batch by batch
(as a test loop would feed it) and computed once; image metrics take each map's max as the score.
sPRO's regions are the individual blobs, with a saturation of 30-100 % of each blob's area (a
LOCO-like mix of relative thresholds).

Peak memory: see ``bench/throughput.py``'s ``PeakMemory`` (process RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on GPU); Δ is the growth over what was resident before the
metric ran (the synthetic maps themselves are not counted).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.table import Table
from scipy import ndimage

BENCH_DIR = Path(__file__).resolve().parent
for path in (BENCH_DIR, BENCH_DIR.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from throughput import PeakMemory, machine_info, make_console, synchronize, write_json_report

from lightning_modules.metrics import AUPRO, AUROC, SPRO, AveragePrecision, F1Max

MAX_BLOBS = 3


@dataclass
class SyntheticMaps:
    maps: torch.Tensor  # N×S×S float32
    masks: torch.Tensor  # N×S×S uint8 {0, 1}
    labels: torch.Tensor  # N long
    regions: torch.Tensor  # N×K×S×S uint8, one blob per layer (zero layers are padding)
    saturation: torch.Tensor  # N×K float, pixels; 0 marks padding


def make_synthetic_maps(images: int, size: int, anomalous_fraction: float, seed: int = 0) -> SyntheticMaps:
    """Blob masks drawn with OpenCV; maps = blurred noise + blurred, raised blobs (see module docstring)."""
    rng = np.random.default_rng(seed)
    anomalous = np.zeros(images, dtype=bool)
    anomalous[: round(anomalous_fraction * images)] = True
    rng.shuffle(anomalous)
    regions = np.zeros((images, MAX_BLOBS, size, size), dtype=np.uint8)
    for index in np.flatnonzero(anomalous):
        for blob in range(rng.integers(1, MAX_BLOBS + 1)):
            centre = tuple(int(v) for v in rng.integers(size // 8, size - size // 8, 2))
            axes = tuple(int(v) for v in rng.integers(max(2, size // 40), max(3, size // 8), 2))
            cv2.ellipse(
                regions[index, blob], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1
            )
    masks = regions.max(axis=1)
    noise = rng.standard_normal((images, size, size)).astype(np.float32)
    signal = masks.astype(np.float32) * rng.uniform(0.5, 1.5, (images, 1, 1)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 3, 3)) * 3 + ndimage.gaussian_filter(
        signal, sigma=(0, 2, 2)
    )
    area = regions.reshape(images, MAX_BLOBS, -1).sum(-1).astype(np.float64)
    saturation = area * rng.uniform(0.3, 1.0, area.shape)
    return SyntheticMaps(
        maps=torch.from_numpy(maps.astype(np.float32)),
        masks=torch.from_numpy(masks),
        labels=torch.from_numpy(anomalous.astype(np.int64)),
        regions=torch.from_numpy(regions),
        saturation=torch.from_numpy(saturation),
    )


@dataclass
class MetricTiming:
    metric: str
    value: float
    update_s: float
    compute_s: float
    total_s: float
    peak_memory_mib: float
    memory_increase_mib: float
    memory_measure: str


def metric_cases(data: SyntheticMaps) -> dict[str, tuple[Callable, Callable[[slice], tuple]]]:
    """name → (metric factory, batch slice → update arguments)."""
    scores = data.maps.flatten(1).amax(dim=1)
    is_normal = data.labels == 0
    image_args = lambda part: (scores[part], data.labels[part])
    pixel_args = lambda part: (data.maps[part], data.masks[part])
    spro_args = lambda part: (data.maps[part], data.regions[part], data.saturation[part], is_normal[part])
    return {
        "image_AUROC": (lambda: AUROC(sync_on_compute=False), image_args),
        "image_AP": (lambda: AveragePrecision(sync_on_compute=False), image_args),
        "image_F1max": (lambda: F1Max(sync_on_compute=False), image_args),
        "pixel_AUROC": (lambda: AUROC(sync_on_compute=False), pixel_args),
        "pixel_AP": (lambda: AveragePrecision(sync_on_compute=False), pixel_args),
        "pixel_AUPRO@0.3": (lambda: AUPRO(fpr_limit=0.3, sync_on_compute=False), pixel_args),
        "pixel_sPRO@0.05": (lambda: SPRO(fpr_limit=0.05, sync_on_compute=False), spro_args),
    }


def time_metric(
    name: str,
    factory: Callable,
    arguments: Callable[[slice], tuple],
    images: int,
    batch_size: int,
    device: torch.device,
) -> MetricTiming:
    memory = PeakMemory(device)
    memory.start()
    metric = factory().to(device)
    synchronize(device)
    started = time.perf_counter()
    for first in range(0, images, batch_size):
        metric.update(*arguments(slice(first, first + batch_size)))
    synchronize(device)
    updated = time.perf_counter()
    value = float(metric.compute())
    synchronize(device)
    finished = time.perf_counter()
    memory.stop()
    del metric
    return MetricTiming(
        name,
        value,
        updated - started,
        finished - updated,
        finished - started,
        memory.peak_mib,
        memory.increase_mib,
        memory.measure,
    )


def main(argv: list[str] | None = None) -> list[MetricTiming]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--anomalous-fraction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32, help="images per update() call")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (region labelling stays on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    console = make_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    data = make_synthetic_maps(args.images, args.size, args.anomalous_fraction, args.seed)
    data = SyntheticMaps(**{f.name: getattr(data, f.name).to(device) for f in fields(data)})
    console.log(
        f"{args.images} synthetic {args.size}×{args.size} maps ({int(data.labels.sum())} anomalous, "
        f"{int((data.saturation > 0).sum())} regions, {data.masks.float().mean():.2%} anomalous pixels) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    info = machine_info(device)
    rows = [
        time_metric(name, factory, arguments, args.images, args.batch_size, device)
        for name, (factory, arguments) in metric_cases(data).items()
    ]
    info["load_average_after"] = machine_info(device).get("load_average_1_5_15")

    table = Table(
        title=f"Metric speed: {args.images} images of {args.size}×{args.size} on {device}, "
        f"updates of {args.batch_size} images"
    )
    for column in ("metric", "value", "update s", "compute s", "total s", "peak MiB", "Δ MiB"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in rows:
        table.add_row(
            row.metric,
            f"{row.value:.4f}",
            f"{row.update_s:.3f}",
            f"{row.compute_s:.3f}",
            f"{row.total_s:.3f}",
            f"{row.peak_memory_mib:.0f}",
            f"{row.memory_increase_mib:.0f}",
        )
    console.print(table)
    console.print(
        f"memory: {rows[0].memory_measure}; Δ = growth over what was resident before the metric "
        "(the synthetic maps are not counted)"
    )
    console.print(f"total {sum(r.total_s for r in rows):.2f} s; machine: {info}")
    report = {"machine": info, "settings": vars(args) | {"json": str(args.json)}, "rows": [asdict(r) for r in rows]}
    write_json_report(args.json, report, console)
    return rows


if __name__ == "__main__":
    main()
