"""A tiny weights-free ULSAD run on real MVTec AD files: does the whole pipeline work on real data?

    python bench/real_data_sanity.py [--data-root ../shared/data] [--image-size 128] [--epochs 3] [--json out.json]

Uses the ``mvtec_ad/grid`` sample of the shared data folder (train/good 25, test 14 with masks;
1024×1024 grayscale PNGs). Measures (1) scanning + validating the files, (2) loading throughput of
the test loader (decode, grayscale → RGB, resize, masks), then (3) runs ``train.train`` — fit, calibrate
on the held-out normal images, test — and reports its metrics, the model-only test throughput and
peak memory that the run folder records.

These are NOT paper numbers: random backbone weights, a half-width reconstruction network, a few
epochs on 21 training images. The run checks that real file formats flow through training and
evaluation and gives the speed of each stage; the metric values only need to be finite.

The data stays where it is (read in place, never copied into the repository); the run folder lives in
a temporary directory that is deleted afterwards. Exits 0 with "skipped: folder absent" when the
shared data folder is not there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (BENCH_DIR, REPO_ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from throughput import machine_info, make_console, prepare_training_bench, write_json_report

CATEGORY = "grid"
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"


def measure_loading(dataset_root: Path, image_size: int, batch_size: int, num_workers: int) -> dict[str, Any]:
    """Scan + validate time, split sizes, and test-loader throughput (decode + resize + masks)."""
    from datamodules.datamodule import AnomalyDataModule

    datamodule = AnomalyDataModule(
        layout="mvtec_ad",
        root=str(dataset_root),
        categories=CATEGORY,
        image_size=image_size,
        eval_batch_size=batch_size,
        num_workers=num_workers,
    )
    started = time.perf_counter()
    datamodule.setup("fit")
    scan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    images = 0
    for batch in datamodule.test_dataloader():
        images += batch["image"].shape[0]
    load_seconds = time.perf_counter() - started
    return {
        "scan_and_validate_s": scan_seconds,
        "split_sizes": {split: len(datamodule.records(split)) for split in ("train", "validation", "test")},
        "test_images_loaded": images,
        "load_images_per_s": images / load_seconds,
        "load_s": load_seconds,
    }


def train_arguments(args: argparse.Namespace, dataset_root: Path, output_root: str) -> list[str]:
    size = args.image_size
    return [
        "--config",
        str(REPO_ROOT / "configs" / "ulsad" / "mvtec_ad.yaml"),
        "--data.layout=mvtec_ad",
        f"--data.root={dataset_root}",
        f"--data.categories={CATEGORY}",
        f"--data.image_size={size}",
        f"--data.num_workers={args.num_workers}",
        f"--data.train_batch_size={args.batch_size}",
        f"--data.eval_batch_size={args.batch_size}",
        "--model.init_args.pretrained=false",
        "--model.init_args.weights_file=null",
        f"--model.init_args.frn_hidden_scale={args.frn_hidden_scale}",
        "--model.init_args.lr=0.001",
        "--model.init_args.lr_milestones=[100]",
        "--model.init_args.max_maps_per_category=0",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.accelerator={args.accelerator}",
        f"--trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--wandb.mode=disabled",
        f"--run.output_root={output_root}",
        "--run.name=real_data_sanity",
    ]


def run_training(args: argparse.Namespace, dataset_root: Path) -> dict[str, Any]:
    import train

    with tempfile.TemporaryDirectory(prefix="bench_real_data_") as output_root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # our sys.argv is not its
        warnings.filterwarnings(
            "ignore", message=".*does not have many workers.*"
        )  # num_workers=0 on purpose
        started = time.perf_counter()
        results = train.train(train_arguments(args, dataset_root, output_root))
        wall_seconds = time.perf_counter() - started
        metrics = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())
    return {
        "wall_s": wall_seconds,
        "metrics": results["table"].flat("test"),
        "run_info": results["run_info"],
        "metrics_json_keys": sorted(metrics),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help="the shared data folder holding mvtec_ad/grid (default: ../shared/data from the repo)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="a multiple of 64, at least 128")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--frn-hidden-scale",
        type=float,
        default=0.5,
        help="width of the reconstruction network (1.0 = the paper's 65 M weights)",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    console = make_console()
    dataset_root = args.data_root.expanduser().resolve() / "mvtec_ad"
    if not (dataset_root / CATEGORY).is_dir():
        console.print(f"skipped: folder absent: {dataset_root / CATEGORY} (pass --data-root)")
        return None
    prepare_training_bench(args.threads)
    info = machine_info(torch.device("cpu"))

    loading = measure_loading(dataset_root, args.image_size, args.batch_size, args.num_workers)
    console.log(
        f"scan + validate {loading['scan_and_validate_s']:.2f} s; splits {loading['split_sizes']}; "
        f"test loader {loading['load_images_per_s']:.1f} img/s"
    )
    training = run_training(args, dataset_root)
    info["load_average_after"] = machine_info(torch.device("cpu")).get("load_average_1_5_15")

    table = Table(
        title=f"Real-data sanity: weights-free ULSAD on mvtec_ad/{CATEGORY}, {args.image_size} px, "
        f"{args.epochs} epochs, {args.precision} (NOT paper numbers)"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    run_info = training["run_info"]
    rows = [
        ("splits (train / validation / test)", " / ".join(str(v) for v in loading["split_sizes"].values())),
        ("scan + validate (s)", f"{loading['scan_and_validate_s']:.2f}"),
        ("test loader, decode + resize (img/s)", f"{loading['load_images_per_s']:.1f}"),
        ("train + calibrate + test wall time (s)", f"{training['wall_s']:.1f}"),
        ("test model throughput (img/s)", f"{run_info.get('model_throughput_img_per_s', math.nan):.2f}"),
        ("peak host memory (MiB, process max RSS)", f"{run_info.get('peak_host_memory_mib', math.nan):.0f}"),
        ("weights", str(run_info.get("weights_source"))),
    ]
    rows += [
        (key.removeprefix("test/"), f"{value:.4f}")
        for key, value in training["metrics"].items()
        if key.startswith(f"test/{CATEGORY}/")
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    not_finite = [key for key, value in training["metrics"].items() if not math.isfinite(value)]
    console.print("all metrics finite" if not not_finite else f"[red]not finite: {not_finite}[/red]")
    console.print(f"machine: {info}")
    report = {
        "machine": info,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "loading": loading,
        "training": {k: v for k, v in training.items()},
    }
    write_json_report(args.json, report, console)
    return report


if __name__ == "__main__":
    main()
