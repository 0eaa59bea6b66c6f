"""Real features on real images: the packaged ImageNet EfficientNet-Lite0 on the MVTec bottle and grid samples.

    python bench/real_features.py [--data-root ../shared/data] [--configs configs/quickstart.yaml ...]
        [--samples bottle grid] [--baseline] [--json out.json]

Two measurements, on the shared ``mvtec_ad/bottle`` sample (80 train/good, 63 defects, 900×900 RGB, no masks) and
``mvtec_ad/grid`` (25 train/good, 3 good + 11 defects with masks, 1024×1024 grayscale):

1. **Are the weights real?** ImageNet top-5 of the packaged Lite0 on every image (resized whole
   to 256 px, as the detectors see them): the share with a bottle class (beer, pill, pop, water or
   wine bottle) among the normal and among the defective bottles, and the classification speed.
2. **Do detectors work on them?** Each config (default: the real-feature quickstart and its
   weights-free twin, so the two differ only in the backbone) trains through ``train.train`` on each sample:
   bottle on 60 normal images (15 % of them held out for calibration), tested on the other 20 plus the 63
   defects (image metrics only); grid in its own MVTec AD layout (the datamodule holds out part of train/good),
   tested on its 14 images, so pixel AUROC too. Image AUROC / AP / F1-max, pixel AUROC, wall time, model-only
   test throughput, peak memory. ``--baseline`` adds a nearest-neighbour patch detector on each config's own
   frozen features and split (image and pixel AUROC): what a feature-reconstruction detector must beat.

The data is read in place (bottle through symbolic links in a temporary folder), never copied into the
repository. Exits 0 with "skipped: folder absent" when the shared data folder is not there.
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


SAMPLES = {"bottle": "mvtec_ad/bottle", "grid": "mvtec_ad/grid"}


def sample_arguments(sample: str, data_root: Path, tmp: str) -> list[str]:
    """The data arguments that train on `sample`: bottle through a folder-layout tree of links with held-out normal
    test images (it has no test/good), grid in place in its MVTec AD layout (masks: pixel metrics)."""
    if sample == "bottle":
        root = bottle_holdout_tree(Path(tmp) / "bottle_split", data_root / SAMPLES["bottle"])
        return ["--data.layout=folder", f"--data.root={root}", "--data.categories=bottle"]
    return ["--data.layout=mvtec_ad", f"--data.root={data_root / 'mvtec_ad'}", f"--data.categories={sample}"]


def detect(config: str, sample: str, data_root: Path, extra: list[str]) -> dict[str, Any]:
    import train

    with tempfile.TemporaryDirectory(prefix="bench_real_features_") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        started = time.perf_counter()
        results = train.train([
            "--config", str(REPO_ROOT / config), *sample_arguments(sample, data_root, tmp),
            f"--run.output_root={tmp}/runs", "--wandb.mode=disabled",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
        ])
        wall = time.perf_counter() - started
        metrics = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())
    run = metrics["run"]
    return {
        "sample": sample, "config": config, "detector": run.get("detector"), "wall_s": wall,
        **metrics["per_category"][sample]["all"],
        "test_images": run.get("test_images"), "test_img_per_s": run.get("model_throughput_img_per_s"),
        "peak_host_memory_mib": run.get("peak_host_memory_mib"), "weights_source": run.get("weights_source"),
    }


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    # torchmetrics reads scores outside [0, 1] as logits (a sigmoid would saturate them): min-max first
    return float(binary_auroc((scores - scores.min()) / (scores.max() - scores.min()), labels.long()))


def nearest_neighbour(config: str, sample: str, data_root: Path, extra: list[str]) -> dict[str, Any]:
    """The baseline a feature-reconstruction detector is built on: the same config's frozen features (its backbone,
    layers and image size, fused to its feature stride), each test patch scored by the L2 distance to its nearest
    training patch (every training patch kept, no coreset), the image by its highest patch, the pixels by the patch
    map resized bilinearly to the image. Same split and the same command-line overrides as detect()."""
    import torch.nn.functional as F

    from lightning_modules.cli import AnomalyCLI

    with tempfile.TemporaryDirectory(prefix="bench_nn_") as tmp:
        cli = AnomalyCLI(program="bench", args=[
            "--config", str(REPO_ROOT / config), *sample_arguments(sample, data_root, tmp),
            f"--run.dir={tmp}/run", "--wandb.mode=disabled", "--trainer.logger=false", *extra])
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
        cli.datamodule.setup("test")
        model = cli.model.model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            bank = torch.cat([model.extract_features(b["image"]) for b in cli.datamodule.statistics_dataloader()])
            bank = bank.permute(0, 2, 3, 1).flatten(0, 2)
            scores, labels, maps, masks = [], [], [], []
            for batch in cli.datamodule.test_dataloader():
                patches = model.extract_features(batch["image"]).permute(0, 2, 3, 1)
                distances = torch.cdist(patches.flatten(1, 2), bank[None].expand(len(patches), -1, -1)).amin(dim=2)
                scores.append(distances.amax(dim=1))
                labels.append(batch["label"])
                patch_map = distances.view(len(patches), 1, *patches.shape[1:3])
                maps.append(F.interpolate(patch_map, size=batch["mask"].shape[-2:], mode="bilinear").flatten())
                masks.append(batch["mask"].flatten())
        scores, labels, maps, masks = (torch.cat(values) for values in (scores, labels, maps, masks))
    return {"sample": sample, "config": f"{config} features", "detector": "nearest neighbour",
            "wall_s": time.perf_counter() - started, "image_AUROC": _auroc(scores, labels),
            "pixel_AUROC": _auroc(maps, masks > 0.5) if bool(masks.any()) else None, "bank_patches": len(bank),
            "test_images": len(labels)}


def detection_table(detections: list[dict[str, Any]]) -> Table:
    """One row per sample and trained config (or baseline), named by the detector."""
    table = Table(title="Detectors on real samples: bottle (60 normal to train, 15 % held out; 20 normal + 63 "
                        "defects to test), grid (MVTec AD split; 3 normal + 11 defects with masks)")
    columns = ("sample", "config", "detector", "image AUROC", "image AP", "F1max", "pixel AUROC", "wall s",
               "test img/s", "peak MiB", "weights")
    for column in columns:
        table.add_column(column, justify="left" if column in ("sample", "config", "detector", "weights") else "right")

    def number(row: dict[str, Any], key: str, digits: int = 3) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.{digits}f}"

    for row in detections:
        table.add_row(row["sample"], row["config"], str(row["detector"]), number(row, "image_AUROC"),
                      number(row, "image_AP"), number(row, "image_F1max"), number(row, "pixel_AUROC"),
                      number(row, "wall_s", 0), number(row, "test_img_per_s", 1),
                      number(row, "peak_host_memory_mib", 0), str(row.get("weights_source", "same features"))[:60])
    return table


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--classify-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--samples", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    parser.add_argument("--baseline", action="store_true",
                        help="also score each config's frozen features by nearest-neighbour patch distance")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py (--key=value form)
    console = make_console()
    data_root = args.data_root.expanduser().resolve()
    absent = [data_root / SAMPLES[sample] for sample in args.samples if not (data_root / SAMPLES[sample]).is_dir()]
    if absent:
        console.print(f"skipped: folder absent: {', '.join(map(str, absent))} (pass --data-root)")
        return None
    prepare_training_bench(args.threads)

    bottle_root = data_root / SAMPLES["bottle"]
    classification = classify(bottle_root, args.classify_size) if bottle_root.is_dir() else None
    if classification is not None:
        table = Table(title=f"Packaged Lite0, ImageNet top-5 on mvtec_ad/bottle ({args.classify_size} px, whole image)")
        for column in ("normal with a bottle class", "defective with a bottle class", "all", "img/s incl. decoding"):
            table.add_column(column, justify="right")
        table.add_row(classification["bottle_in_top5_normal"], classification["bottle_in_top5_defective"],
                      f"{classification['bottle_in_top5_all']:.3f}",
                      f"{classification['images_per_s_with_decoding']:.1f}")
        console.print(table)

    detections = []
    for sample in args.samples:
        detections += [detect(config, sample, data_root, extra) for config in args.configs]
        if args.baseline:
            detections += [nearest_neighbour(config, sample, data_root, extra) for config in args.configs]
    console.print(detection_table(detections))
    report = {"machine": machine_info(torch.device("cpu")), "classification": classification, "detection": detections}
    write_json_report(args.json, report, console)
    return report


if __name__ == "__main__":
    main()
