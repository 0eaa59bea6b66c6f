"""Real features on real images: the packaged ImageNet EfficientNet-Lite0 on the MVTec bottle sample.

    python bench/real_features.py [--data-root ../shared/data] [--configs configs/quickstart.yaml ...] [--json out.json]

Two measurements, on the shared ``mvtec_ad/bottle`` sample (80 train/good, 63 defects, 900×900 RGB):

1. **Are the weights real?** ImageNet top-5 of the packaged Lite0 on every image (resized whole
   to 256 px, as the detectors see them): the share with a bottle class (beer, pill, pop, water or
   wine bottle) among the normal and among the defective bottles, and the classification speed.
2. **Do detectors work on them?** Each config (default: the real-feature quickstart and its
   weights-free twin, so the two differ only in the backbone) trains through ``train.train`` on 60
   normal images (15 % of them held out for calibration) and is tested on the other 20 plus the 63
   defects: image AUROC / AP / F1-max, wall time, model-only test throughput, peak memory.

The sample has no masks, so only image metrics exist. The data is read in place through symbolic
links in a temporary folder (never copied into the repository). Exits 0 with "skipped: folder
absent" when the shared data folder is not there.
"""

from __future__ import annotations

import argparse
import json
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

from tests.real_samples import (
    IMAGENET_BOTTLE_CLASSES,
    bottle_holdout_tree,
    bottle_images,
    imagenet_top5,
    load_lite0_classifier,
)

DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CONFIGS = ("configs/quickstart.yaml", "configs/quickstart_weights_free.yaml")


def classify(bottle_root: Path, size: int) -> dict[str, Any]:
    model, source = load_lite0_classifier()
    paths = bottle_images(bottle_root)
    started = time.perf_counter()
    top5 = imagenet_top5(model, paths, size=size)
    seconds = time.perf_counter() - started
    hits = torch.isin(top5, torch.tensor(IMAGENET_BOTTLE_CLASSES)).any(dim=1)
    normal = torch.tensor([path.parent.name == "good" for path in paths])
    return {
        "weights_source": source,
        "images": len(paths),
        "bottle_in_top5_normal": f"{int(hits[normal].sum())}/{int(normal.sum())}",
        "bottle_in_top5_defective": f"{int(hits[~normal].sum())}/{int((~normal).sum())}",
        "bottle_in_top5_all": float(hits.float().mean()),
        "images_per_s_with_decoding": len(paths) / seconds,
    }


def detect(config: str, bottle_root: Path, extra: list[str]) -> dict[str, Any]:
    import train

    with tempfile.TemporaryDirectory(prefix="bench_real_features_") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        root = bottle_holdout_tree(Path(tmp) / "bottle_split", bottle_root)
        started = time.perf_counter()
        results = train.train([
            "--config", str(REPO_ROOT / config), "--data.layout=folder", f"--data.root={root}",
            "--data.categories=bottle", f"--run.output_root={tmp}/runs", "--wandb.mode=disabled",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
        ])
        wall = time.perf_counter() - started
        metrics = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())
    run = metrics["run"]
    return {
        "config": config, "detector": run.get("detector"), "wall_s": wall, **metrics["per_category"]["bottle"]["all"],
        "test_images": run.get("test_images"), "test_img_per_s": run.get("model_throughput_img_per_s"),
        "peak_host_memory_mib": run.get("peak_host_memory_mib"), "weights_source": run.get("weights_source"),
    }


def nearest_neighbour(config: str, bottle_root: Path) -> dict[str, Any]:
    """The baseline a feature-reconstruction detector is built on: the same config's frozen features (its backbone,
    layers and image size, fused to its feature stride), each test patch scored by the L2 distance to its nearest
    training patch (every training patch kept, no coreset), the image by its highest patch. Same split as detect()."""
    from torchmetrics.functional.classification import binary_auroc

    from lightning_modules.cli import AnomalyCLI

    with tempfile.TemporaryDirectory(prefix="bench_nn_") as tmp:
        root = bottle_holdout_tree(Path(tmp) / "bottle_split", bottle_root)
        cli = AnomalyCLI(program="bench", args=[
            "--config", str(REPO_ROOT / config), "--data.layout=folder", f"--data.root={root}",
            "--data.categories=bottle", f"--run.dir={tmp}/run", "--wandb.mode=disabled", "--trainer.logger=false"])
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
        cli.datamodule.setup("test")
        model = cli.model.model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            bank = torch.cat([model.extract_features(b["image"]) for b in cli.datamodule.statistics_dataloader()])
            bank = bank.permute(0, 2, 3, 1).flatten(0, 2)
            scores, labels = [], []
            for batch in cli.datamodule.test_dataloader():
                patches = model.extract_features(batch["image"]).permute(0, 2, 3, 1)
                distances = torch.cdist(patches.flatten(1, 2), bank[None].expand(len(patches), -1, -1))
                scores.append(distances.amin(dim=2).amax(dim=1))
                labels.append(batch["label"])
        scores, labels = torch.cat(scores), torch.cat(labels)
    return {"config": f"{config} features", "detector": "nearest neighbour", "wall_s": time.perf_counter() - started,
            # torchmetrics reads scores outside [0, 1] as logits (a sigmoid would saturate them): min-max first
            "image_AUROC": float(binary_auroc((scores - scores.min()) / (scores.max() - scores.min()), labels)), "bank_patches": len(bank),
            "test_images": len(labels)}


def detection_table(detections: list[dict[str, Any]]) -> Table:
    """One row per trained config, named by the detector it trained."""
    table = Table(title="Detectors on mvtec_ad/bottle: 60 normal to train (15 % held out), 20 normal + 63 defects to test")
    for column in ("config", "detector", "image AUROC", "image AP", "F1max", "wall s", "test img/s", "peak MiB", "weights"):
        table.add_column(column, justify="left" if column in ("config", "detector", "weights") else "right")
    for row in detections:
        table.add_row(row["config"], str(row["detector"]), f"{row['image_AUROC']:.3f}", f"{row['image_AP']:.3f}",
                      f"{row['image_F1max']:.3f}", f"{row['wall_s']:.0f}", f"{row['test_img_per_s']:.1f}",
                      f"{row['peak_host_memory_mib']:.0f}", str(row["weights_source"])[:60])
    return table


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--classify-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline", action="store_true",
                        help="also score each config's frozen features by nearest-neighbour patch distance")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py (--key=value form)
    console = make_console()
    bottle_root = args.data_root.expanduser().resolve() / "mvtec_ad" / "bottle"
    if not bottle_root.is_dir():
        console.print(f"skipped: folder absent: {bottle_root} (pass --data-root)")
        return None
    prepare_training_bench(args.threads)

    classification = classify(bottle_root, args.classify_size)
    table = Table(title=f"Packaged Lite0, ImageNet top-5 on mvtec_ad/bottle ({args.classify_size} px, whole image)")
    for column in ("normal with a bottle class", "defective with a bottle class", "all", "img/s incl. decoding"):
        table.add_column(column, justify="right")
    table.add_row(classification["bottle_in_top5_normal"], classification["bottle_in_top5_defective"],
                  f"{classification['bottle_in_top5_all']:.3f}", f"{classification['images_per_s_with_decoding']:.1f}")
    console.print(table)

    detections = [detect(config, bottle_root, extra) for config in args.configs]
    table = detection_table(detections)
    console.print(table)
    if args.baseline:
        for config in args.configs:
            baseline = nearest_neighbour(config, bottle_root)
            console.print(f"{baseline['detector']} on {baseline['config']}: image AUROC {baseline['image_AUROC']:.3f} "
                          f"({baseline['bank_patches']} training patches, {baseline['test_images']} test images)")
            detections.append(baseline)
    report = {"machine": machine_info(torch.device("cpu")), "classification": classification, "detection": detections}
    write_json_report(args.json, report, console)
    return report


if __name__ == "__main__":
    main()
