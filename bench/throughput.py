"""Model-only inference throughput and peak memory of a detector; optionally one training step.

    python bench/throughput.py --config configs/ulsad/mvtec_ad.yaml --image-size 256 --batch-size 8 \
        --precision fp32 bf16 --iterations 5 --warmup 1 [--json out.json] [--model.init_args.frn_hidden_scale=0.5]

The detector is built by the same command line as ``train.py`` (``AnomalyCLI``), so any dotted
override after the options reaches it, inside ``weights_restored_later()`` as for loading a checkpoint:
no pretrained weights are looked up (random backbone / teacher, no penalty images), which changes no
layer shape and hence no speed. No Trainer is involved: its fitted statistics (feature
standardisation, map quantiles, Gaussians, decision threshold) are fitted on random images through
the detector's own public hooks (``fit_training_statistics``, ``calibrate``), so the model's
``forward`` runs the same code path as after training.

What is timed: the model's ``forward`` (``AnomalyModel``: networks, map post-processing, image score;
no data loading, no metrics) on a batch already on the device, under ``torch.inference_mode`` like
Lightning's test loop; ``torch.cuda.synchronize`` around every batch on GPU. ``--train-step`` times
forward + backward + optimizer step of ``training_step``.

Compute: FLOPs per image of that forward (``torch.utils.flop_counter``, one fp32 pass; a multiply-add
counts 2), and the fraction of this machine's peak they reach, with the peak measured in the same run
by a large matmul in the same precision (``--peak-size``) at the start and at the end of the run (their
mean; the machine's attainable FLOP/s drifts on a shared host). When anomalib is installed, its
EfficientAD-S torch model is timed in the same run as a reference (``--anomalib``).

Peak memory:
- cuda: ``torch.cuda.max_memory_allocated`` over warm-up and timed batches (tensors only; the caching
  allocator's reserve and the CUDA context are not counted), and its increase over what was allocated
  before (the model and the input batch);
- cpu: the process's resident-set high-water mark (``VmHWM``), reset just before the warm-up by writing
  5 to ``/proc/self/clear_refs`` after ``malloc_trim`` has returned freed heap to the OS, and its increase
  over the resident set at that moment (the model and the input batch are already resident). The
  absolute peak includes the Python interpreter and the loaded libraries (~0.4-0.5 GiB with torch). RSS
  counts every allocation torch makes, which ``tracemalloc`` (Python allocations only) does not see.
  Where the reset is unavailable (not Linux), ``resource.getrusage`` max-RSS growth is reported, which
  is a lower bound because the statistics fitting before may already have set a higher mark.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PRECISIONS = ("fp32", "bf16")
MIB = 2**20


# ---------------------------------------------------------------------- memory
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_heap() -> None:
    """Hand memory that was freed but kept by glibc's malloc back to the OS (``malloc_trim``).

    Without it the resident set at ``start()`` would include the heap freed by earlier work (fitting the
    statistics), the measured code would reuse those pages, and its increase would read as zero.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the increase may be understated, the peak is unaffected


def _max_rss_mib() -> float:
    """getrusage's max RSS: KiB on Linux, bytes on macOS."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


class PeakMemory:
    """Peak memory of the code run between ``start()`` and ``stop()`` on one device.

    ``peak_mib`` is the high-water mark; ``increase_mib`` its growth over what was in use at ``start()``;
    ``measure`` names what was read, so a reader knows which of the three methods produced the figure.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")
        self.increase_mib = float("nan")
        self.measure = ""

    def start(self) -> None:
        gc.collect()
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device) / MIB
            self.measure = "torch.cuda.max_memory_allocated"
            return
        try:  # Linux: reset VmHWM to the current RSS so the mark belongs to this measurement alone
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._baseline = _proc_status_kib("VmRSS") / 1024
            self.measure = "process RSS high-water (VmHWM, reset)"
        except (OSError, TypeError):
            self._baseline = _max_rss_mib()
            self.measure = "getrusage max-RSS growth (lower bound)"

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self.measure.startswith("process RSS"):
            self.peak_mib = _proc_status_kib("VmHWM") / 1024
        else:
            self.peak_mib = _max_rss_mib()
        self.increase_mib = max(0.0, self.peak_mib - self._baseline)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(precision: str, device: torch.device):
    """bf16 = autocast to bfloat16, exactly what Lightning's ``bf16-mixed`` does; fp32 = nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------- building a detector
def _cli_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def detector_class(config: str | Path) -> type:
    """The LightningModule class named by a config's ``model.class_path`` (ImportError if it is not there)."""
    from lightning_modules.config_files import read_config

    class_path = read_config(config)["model"]["class_path"]
    module_name, class_name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def build_detector(config: str | Path, image_size: int | None, extra_args: list[str], run_dir: str):
    """The detector of ``config`` as ``train.py`` would build it, weights-free, plus overrides.

    Returns the module (on CPU, not attached to a trainer).
    """
    from lightning_modules.cli import AnomalyCLI
    from networks.backbones import weights_restored_later

    args = [
        "--config",
        str(config),
        f"--run.dir={run_dir}",
        "--wandb.mode=disabled",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]
    if image_size is not None:
        args.append(f"--data.image_size={image_size}")  # the model takes it from there
    with warnings.catch_warnings(), weights_restored_later():
        warnings.filterwarnings(
            "ignore", message="LightningCLI's args parameter"
        )  # our own sys.argv is not its
        cli = AnomalyCLI(args=args + list(extra_args))
    return cli.model


def random_batches(
    count: int, batch_size: int, image_size: int, device: torch.device, seed: int = 0
) -> list[dict]:
    """Dict batches shaped like the datamodule's (normal images: label 0, empty masks), random pixels."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for position in range(count):
        images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
        batches.append(
            {
                "image": images.to(device),
                "mask": torch.zeros(batch_size, 1, image_size, image_size, device=device),
                "label": torch.zeros(batch_size, dtype=torch.long, device=device),
                "has_mask": torch.ones(batch_size, dtype=torch.bool, device=device),
                "index": torch.arange(position * batch_size, (position + 1) * batch_size, device=device),
                "category": ["random"] * batch_size,
                "path": [f"random_{position}_{i}.png" for i in range(batch_size)],
                "defect_type": ["good"] * batch_size,
                "anomaly_kind": ["good"] * batch_size,
                # what a training batch adds for detectors that train on synthetic anomalies or prompts (OneNIP)
                "synthetic_image": images.flip(-1).to(device),
                "synthetic_mask": torch.zeros(batch_size, 1, image_size, image_size, device=device),
                "prompt_image": images.flip(-2).to(device),
                "prompt_index": torch.arange(batch_size, device=device) + 10_000 * (position + 1),
            }
        )
    return batches


def fit_dummy_statistics(
    detector, train_batches: list[dict], validation_batches: list[dict], precision: str
) -> None:
    """Run the detector's own fitting hooks on random images, as training and calibration would.

    Distinct "train" and "validation" images, as in a real run: statistics fitted and then evaluated on the
    same few images can degenerate (e.g. two points are equidistant from their own mean, so a z-score's
    standard deviation would be 0).
    """
    device = train_batches[0]["image"].device
    with precision_context(precision, device):
        if detector.fit_only:  # a memory bank: its one fitting pass
            detector.fit_pass(train_batches)
        else:
            detector.fit_training_statistics(train_batches)
        detector.calibrate(validation_batches, train_batches)


def count_flops_per_image(model, image_size: int, device: torch.device) -> float:
    """FLOPs of one image through the model's forward (fp32; torch.utils.flop_counter counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, image_size, image_size, device=device)
    fields = model.example_fields(1) if hasattr(model, "example_fields") else {}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(images, **fields)
    return float(counter.get_total_flops())


def measure_matmul_peak(precision: str, device: torch.device, size: int, seconds: float = 2.0) -> float:
    """FLOP/s of a size×size×size matmul in this precision: the attainable peak the detectors are compared with."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.rand(size, size, device=device, dtype=dtype)
    b = torch.rand(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel choice, packing buffers
    synchronize(device)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        repeats += 1
        synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


# ---------------------------------------------------------------------- measurements
@dataclass
class Measurement:
    detector: str
    config: str
    mode: str  # "predict" | "train-step"
    device: str
    precision: str
    channels_last: bool
    threads: int
    batch_size: int
    image_size: int
    iterations: int
    images_per_s: float
    ms_per_image: float
    batch_ms_median: float
    batch_ms_min: float
    peak_memory_mib: float
    memory_increase_mib: float
    memory_measure: str
    gflop_per_image: float = float("nan")
    peak_gflop_per_s: float = float("nan")  # mean of the matmul peaks measured at the start and end of the run
    fraction_of_peak: float = float("nan")
    notes: list[str] = field(default_factory=list)


def _time_batches(run_batch, iterations: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        run_batch()
    synchronize(device)
    seconds = []
    for _ in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        run_batch()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _optimizer_of(configured) -> torch.optim.Optimizer:
    """The optimizer out of any return form of ``configure_optimizers``."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    first = configured[0]
    return first[0] if isinstance(first, (list, tuple)) else _optimizer_of(first)


def measure(
    config: str, args: argparse.Namespace, precision: str, extra_args: list[str], console: Console,
) -> Measurement:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as run_dir:
        detector = build_detector(config, args.image_size, extra_args, run_dir)
    image_size = args.image_size or int(detector.hparams.get("image_size", 256))
    detector.to(device)
    if args.channels_last:
        detector.to(memory_format=torch.channels_last)
    # At least 4 images each: a spread (standard deviation, quantile range) of fewer is degenerate.
    fit_batches = max(args.fit_batches, math.ceil(4 / args.batch_size))
    batches = random_batches(fit_batches, args.batch_size, image_size, device)
    validation_batches = random_batches(fit_batches, args.batch_size, image_size, device, seed=100)
    started = time.perf_counter()
    fit_dummy_statistics(detector, batches, validation_batches, precision)
    console.log(
        f"{type(detector).__name__}: statistics fitted on 2×{fit_batches} random batch(es) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    notes = []
    batch = random_batches(1, args.batch_size, image_size, device, seed=200)[0]
    if args.channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)

    memory = PeakMemory(device)
    if args.train_step:
        optimizer = _optimizer_of(detector.build_optimizers(total_steps=1000))
        detector.train()
        if getattr(detector.hparams, "cache_features", False):
            notes.append(
                "backbone features cached after the first step (epochs ≥ 2); "
                "--model.init_args.cache_features=false times the first epoch"
            )

        def run_batch() -> None:
            with precision_context(precision, device):
                loss = detector.training_step(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        detector.eval()
        model = detector.model
        fields = model.example_fields(batch["image"].shape[0])  # e.g. a per-category model's category_index

        def run_batch() -> None:
            with torch.inference_mode(), precision_context(precision, device):
                model(batch["image"], **fields)

    memory.start()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
        seconds = _time_batches(run_batch, args.iterations, args.warmup, device)
    memory.stop()
    total = sum(seconds)
    images_per_s = args.batch_size * len(seconds) / total
    flops = count_flops_per_image(detector.model, image_size, device) if not args.train_step else float("nan")
    result = Measurement(
        detector=type(detector).__name__,
        config=str(config),
        mode="train-step" if args.train_step else "predict",
        device=str(device),
        precision=precision,
        channels_last=args.channels_last,
        threads=torch.get_num_threads(),
        batch_size=args.batch_size,
        image_size=image_size,
        iterations=args.iterations,
        images_per_s=images_per_s,
        ms_per_image=1000 * total / (args.batch_size * len(seconds)),
        batch_ms_median=1000 * statistics.median(seconds),
        batch_ms_min=1000 * min(seconds),
        peak_memory_mib=memory.peak_mib,
        memory_increase_mib=memory.increase_mib,
        memory_measure=memory.measure,
        gflop_per_image=flops / 1e9,
        notes=notes,
    )
    return result


def measure_anomalib_efficientad(args: argparse.Namespace, precision: str, console: Console) -> Measurement | None:
    """anomalib's EfficientAD-S torch model timed exactly like ours (None when anomalib is not installed).

    Its forward in eval mode includes its own map post-processing (quantile normalisation, upsampling
    to the input size, max score), so the two timings cover the same work, except the ImageNet input
    normalisation, which anomalib 2 does in its pre-processor (negligible).
    """
    if importlib.util.find_spec("anomalib") is None:
        console.print("anomalib is not installed: no reference row (pip install anomalib to add one)")
        return None
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel, EfficientAdModelSize

    device = torch.device(args.device)
    image_size = args.image_size or 256
    model = EfficientAdModel(teacher_out_channels=384, model_size=EfficientAdModelSize.S).to(device).eval()
    with torch.no_grad():  # the statistics anomalib fits before inference, set to harmless values
        model.mean_std["mean"].zero_()
        model.mean_std["std"].fill_(1.0)
        for key, value in model.quantiles.items():  # qa_st, qb_st, qa_ae, qb_ae
            value.fill_(1.0 if key.startswith("qb") else 0.0)
    images = torch.rand(args.batch_size, 3, image_size, image_size, device=device)

    def run_batch() -> None:
        with torch.inference_mode(), precision_context(precision, device):
            model(images)

    memory = PeakMemory(device)
    memory.start()
    seconds = _time_batches(run_batch, args.iterations, args.warmup, device)
    memory.stop()
    total = sum(seconds)
    images_per_s = args.batch_size * len(seconds) / total
    flops = count_flops_per_image(model, image_size, device)
    return Measurement(
        detector="anomalib EfficientAD-S", config="anomalib " + importlib.metadata.version("anomalib"),
        mode="predict", device=str(device), precision=precision, channels_last=False,
        threads=torch.get_num_threads(), batch_size=args.batch_size, image_size=image_size,
        iterations=args.iterations, images_per_s=images_per_s,
        ms_per_image=1000 * total / (args.batch_size * len(seconds)),
        batch_ms_median=1000 * statistics.median(seconds), batch_ms_min=1000 * min(seconds),
        peak_memory_mib=memory.peak_mib, memory_increase_mib=memory.increase_mib, memory_measure=memory.measure,
        gflop_per_image=flops / 1e9,
    )


def measure_coreset(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """PatchCore's greedy k-center coreset on a random ``--coreset-bank`` N×C bank (float32, seeded): ours
    (``networks.patchcore.k_center_greedy``, chunked) and, when installed, anomalib's ``KCenterGreedy``, each
    timed and with its peak memory increase over the bank itself (the same meters as the detector rows)."""
    from networks.patchcore import (
        coreset_peak_bytes,
        k_center_greedy,
        projection_dimension,
        sparse_random_projection,
    )

    samples, channels = args.coreset_bank
    device = torch.device(args.device)
    bank = torch.randn(samples, channels, generator=torch.Generator().manual_seed(0)).to(device)
    size = max(1, int(samples * args.coreset_ratio))
    components = projection_dimension(samples)
    rows = []

    def ours() -> None:
        generator = torch.Generator().manual_seed(0)
        projection = sparse_random_projection(channels, components, generator)
        k_center_greedy(bank, size, projection, 0, chunk_rows=args.coreset_chunk, device=device)

    def anomalib_k_center() -> None:
        from anomalib.models.components.sampling import KCenterGreedy

        torch.manual_seed(0)
        KCenterGreedy(embedding=bank, sampling_ratio=args.coreset_ratio).select_coreset_idxs()

    implementations = [("ours (chunked)", ours)]
    if importlib.util.find_spec("anomalib") is not None:
        implementations.append((f"anomalib {importlib.metadata.version('anomalib')} KCenterGreedy", anomalib_k_center))
    else:
        console.print("anomalib is not installed: no reference coreset row")
    for name, run in implementations:
        memory = PeakMemory(device)
        memory.start()
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - start
        memory.stop()
        rows.append({"implementation": name, "bank": [samples, channels], "coreset": size,
                     "projection_dimension": components, "seconds": seconds, "ms_per_center": 1000 * seconds / size,
                     "peak_memory_increase_mib": memory.increase_mib, "memory_measure": memory.measure})
    stated = coreset_peak_bytes(samples, components, args.coreset_chunk, channels) / MIB
    table = Table(title=f"PatchCore coreset: {size} of {samples} × {channels} rows ({device}; stated bound of ours: "
                        f"{stated:.0f} MiB)")
    for column in ("implementation", "seconds", "ms / center", "peak memory increase (MiB)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["implementation"], f"{row['seconds']:.1f}", f"{row['ms_per_center']:.2f}",
                      f"{row['peak_memory_increase_mib']:.0f}")
    console.print(table)
    return rows


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = list(os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: list[Measurement], console: Console) -> None:
    modes = " + ".join(dict.fromkeys(row.mode for row in rows))
    table = Table(title=f"Detector {modes} throughput (no data loading; random images; weights-free)")
    for name in (
        "detector",
        "mode",
        "device",
        "precision",
        "batch",
        "size",
        "img/s",
        "ms/img",
        "ms/batch (median)",
        "peak MiB",
        "Δ MiB",
        "GFLOP/img",
        "% of peak",
    ):
        table.add_column(
            name, justify="right" if name not in ("detector", "mode", "device", "precision") else "left"
        )
    for row in rows:
        table.add_row(
            row.detector,
            row.mode,
            row.device,
            row.precision + (" CL" if row.channels_last else ""),
            str(row.batch_size),
            str(row.image_size),
            f"{row.images_per_s:.2f}",
            f"{row.ms_per_image:.1f}",
            f"{row.batch_ms_median:.0f}",
            f"{row.peak_memory_mib:.0f}",
            f"{row.memory_increase_mib:.0f}",
            f"{row.gflop_per_image:.1f}" if math.isfinite(row.gflop_per_image) else "–",
            f"{100 * row.fraction_of_peak:.0f}%" if math.isfinite(row.fraction_of_peak) else "–",
        )
    console.print(table)
    for measure in dict.fromkeys(row.memory_measure for row in rows):
        console.print(f"memory: {measure}; Δ = growth over the model and input already resident")
    if any(row.mode == "train-step" for row in rows):
        console.print("train-step memory includes the optimizer state created in the warm-up step")
    for note in dict.fromkeys(note for row in rows for note in row.notes):
        console.print(f"note: {note}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Unrecognised --dotted.key=value arguments go to the detector's command line (as in train.py).",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        default=["configs/ulsad/mvtec_ad.yaml"],
        help="one or more detector configs; a detector whose class cannot be imported is skipped",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["bf16"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--iterations", type=int, default=5, help="timed batches")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed batches first (allocator, kernel choice)"
    )
    parser.add_argument("--fit-batches", type=int, default=1, help="random batches for the dummy statistics")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="convert the whole module and the input to channels_last (the networks already do "
        "it for their conv stacks; this also covers the rest)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--train-step",
        action="store_true",
        help="time forward + backward + optimizer step of training_step instead of predict",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and machine facts here")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak-FLOP/s matmul")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds of rest after the first peak measurement")
    parser.add_argument("--anomalib", choices=("auto", "off"), default="auto",
                        help="auto: also time anomalib's EfficientAD-S torch model when anomalib is installed")
    parser.add_argument("--coreset-bank", type=int, nargs=2, metavar=("N", "C"), default=None,
                        help="also time PatchCore's coreset selection on a random N×C bank, ours and anomalib's "
                             "(e.g. 200000 1536)")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="fraction of the bank kept (0.01)")
    parser.add_argument("--coreset-chunk", type=int, default=4096, help="rows per chunk of ours")
    return parser.parse_known_args(argv)


def quiet_lightning() -> None:
    """Lightning's INFO lines (accelerator summary, seed) for every detector built would bury the table.

    Lightning sets its loggers to INFO when imported, so import it first.
    """
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def prepare_training_bench(threads: int | None) -> None:
    """For scripts that train through train.py: quiet Lightning and the data scan; optionally fix the thread count."""
    quiet_lightning()
    logging.getLogger("datamodules").setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


def write_json_report(path: Path | None, report: dict[str, Any], console: Console) -> None:
    """Write a benchmark's figures as JSON (when --json was given), creating the folder."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"wrote {path}")


def make_console() -> Console:
    """Rich wraps to 80 columns when the output is not a terminal; the tables need more."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def main(argv: list[str] | None = None) -> list[Measurement]:
    args, extra_args = parse_args(argv)
    quiet_lightning()
    console = make_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda asked for, but torch sees no GPU[/red]")
        raise SystemExit(2)
    info = machine_info(device)
    # The peak is measured at the start and at the end of the run, and every row is compared with their mean: on a
    # shared machine the attainable FLOP/s drifts by tens of percent. Not between rows, and the start is followed
    # by a pause: in A/B runs here, detectors timed right after seconds of full-load matmul looked 20-40% slower.
    peak_samples = {precision: [measure_matmul_peak(precision, device, args.peak_size)] for precision in args.precision}
    time.sleep(args.pause)
    rows: list[Measurement] = []
    skipped: dict[str, str] = {}
    for config in args.config:
        try:
            detector_class(config)
        except (ImportError, AttributeError) as error:
            skipped[config] = f"{type(error).__name__}: {error}"
            console.print(
                f"[yellow]skipped {config}: detector class not importable ({skipped[config]})[/yellow]"
            )
            continue
        for precision in args.precision:
            rows.append(measure(config, args, precision, extra_args, console))
    if args.anomalib == "auto" and not args.train_step:
        for precision in args.precision:
            row = measure_anomalib_efficientad(args, precision, console)
            if row is not None:
                rows.append(row)
    for precision, samples in peak_samples.items():
        samples.append(measure_matmul_peak(precision, device, args.peak_size))
    for row in rows:
        peak = statistics.mean(peak_samples[row.precision])
        row.peak_gflop_per_s = peak / 1e9
        row.fraction_of_peak = row.gflop_per_image * 1e9 * row.images_per_s / peak
    info["matmul_peak_gflop_per_s"] = {precision: [value / 1e9 for value in values]
                                       for precision, values in peak_samples.items()}
    console.print("measured peak (GFLOP/s, at the start and at the end): " + "; ".join(
        f"{p} " + ", ".join(f"{v / 1e9:.0f}" for v in values) for p, values in peak_samples.items())
        + f" ({args.peak_size}³ matmul)")
    if hasattr(os, "getloadavg"):
        info["load_average_after"] = list(os.getloadavg())
    if rows:
        print_table(rows, console)
    coreset = measure_coreset(args, console) if args.coreset_bank else []
    console.print(f"machine: {info}")
    report = {"machine": info, "extra_args": extra_args, "skipped": skipped, "rows": [asdict(r) for r in rows],
              "coreset": coreset}
    write_json_report(args.json, report, console)
    return rows


if __name__ == "__main__":
    main()
