"""Evaluate a trained checkpoint in a fresh process, or score a folder of new images with it.

    python evaluate.py --checkpoint runs/<run>/checkpoints/final.ckpt [--output_dir DIR] [--data.root ...]
    python evaluate.py --checkpoint runs/<run>/checkpoints/final.ckpt --images DIR [--save-maps] [--output_dir DIR]

Test mode (no --images) rebuilds the datamodule and detector from the run's saved config.yaml (any
extra argument overrides it, e.g. another ``--data.categories``), loads every weight and fitted
statistic from the checkpoint, tests, and writes metrics.json, scores.csv and maps/ into DIR
(default ``<run>/evaluate``). No pretrained weights are looked up: the checkpoint holds them all.
With --recalibrate the trained networks are kept and every statistic and threshold is fitted again on
the training and held-out normal images, so one trained model can be scored under another fitted
setting (PUAD's feature_source) without training again.

Predict mode (--images) needs no labels and no config: every image under DIR (recursively, PNG /
JPEG / BMP / TIFF, grey or colour) is scored with the checkpoint's model, and DIR_OUT (default
``<run>/predictions``) receives predictions.csv (path, score, normalized_score, predicted_label;
the label uses the decision threshold stored in the checkpoint), maps/*.png (the map over the
image, mid-colour = threshold) and, with --save-maps, raw_maps/*.npy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lightning_modules import reporting
from lightning_modules.cli import AnomalyCLI, run_command
from lightning_modules.prediction import load_detector, predict_folder
from lightning_modules.progress import phase
from lightning_modules.resume import read_checkpoint
from networks.backbones import weights_restored_later


def _predict(known: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    detector = load_detector(known.checkpoint, map_location=known.device)
    output_dir = known.output_dir or run_dir / "predictions"
    summary = predict_folder(detector, known.images, output_dir, batch_size=known.batch_size,
                             save_maps=known.save_maps, num_workers=known.num_workers, precision=known.precision)
    Console().print(f"{summary.images} images scored, {summary.anomalous} above the decision threshold "
                    f"({float(detector.model.image_threshold):.6g}); wrote {summary.csv_path}"
                    + (f"; skipped {len(summary.skipped)} unreadable files" if summary.skipped else ""))
    return {"predictions": summary}


def _recalibrate(cli: AnomalyCLI, checkpoint: dict[str, Any]) -> None:
    """Load the checkpoint's weights, then fit every statistic and the threshold again, as after training.

    The record of the settings the old statistics were fitted under is dropped first: they are all replaced
    here, so a fitted setting (PUAD's feature_source) may differ from the checkpoint's.
    """
    state = {key: ({"fitted_with": {}} if key.endswith("._extra_state") else value)
             for key, value in checkpoint["state_dict"].items()}
    detector = cli.model
    detector.on_load_checkpoint(checkpoint)
    detector.load_state_dict(state)
    cli.datamodule.setup("fit")
    detector.eval()
    with phase("fitting the statistics and the threshold again on the training and held-out normal images"), \
            torch.no_grad(), cli.trainer.precision_plugin.forward_context():
        detector.calibrate(cli.datamodule.val_dataloader(), cli.datamodule.statistics_dataloader())


def evaluate(args: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=None, help="default: <run>/config.yaml beside checkpoints/")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="default: <run>/evaluate (test) or <run>/predictions (--images)")
    parser.add_argument("--images", type=Path, default=None, help="score every image under this folder instead")
    parser.add_argument("--save-maps", action="store_true", help="--images: also write the raw maps as .npy")
    parser.add_argument("--batch-size", type=int, default=8, help="--images: images per forward pass")
    parser.add_argument("--num-workers", type=int, default=0, help="--images: image-decoding worker processes")
    parser.add_argument("--device", default="cpu", help="--images: cpu | cuda | cuda:N")
    parser.add_argument("--recalibrate", action="store_true",
                        help="test mode: keep the checkpoint's trained networks but fit every statistic and threshold "
                             "again on the training and held-out normal images (never the test images), so a fitted "
                             "setting can change, e.g. --model.init_args.feature_source=teacher for PUAD")
    parser.add_argument("--precision", default=None,
                        help="--images: 32-true | bf16-mixed | ...; default: the precision the checkpoint was "
                             "calibrated under, so scores match its threshold")
    known, overrides = parser.parse_known_args(args)
    if not known.checkpoint.is_file():
        raise SystemExit(f"evaluate.py: checkpoint {known.checkpoint} does not exist")
    run_dir = known.checkpoint.resolve().parent.parent
    if known.images is not None:
        if overrides:
            raise SystemExit(f"evaluate.py --images takes no config overrides, got {overrides}")
        return _predict(known, run_dir)
    config = known.config or run_dir / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"evaluate.py: no config {config}; pass --config with the training config")
    output_dir = known.output_dir or run_dir / "evaluate"
    with weights_restored_later():
        cli = AnomalyCLI(program="evaluate.py", args=["--config", str(config), "--wandb.mode=disabled", "--trainer.logger=false",
                               *overrides, f"--run.dir={output_dir}", "--run.resume=false"])
    cli.datamodule.prepare_data()
    cli.datamodule.setup("test")  # a bad dataset fails before the checkpoint is loaded
    checkpoint = read_checkpoint(known.checkpoint)  # an unreadable checkpoint fails with its path named
    cli.save_resolved_config()  # beside metrics.json, as in a training run: what was evaluated, and how
    if known.recalibrate:
        _recalibrate(cli, checkpoint)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    else:
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(known.checkpoint), verbose=False)
    results = cli.model.test_results or {}
    if cli.trainer.is_global_zero and results:
        console = Console()
        console.print(f"Checkpoint: {known.checkpoint}", soft_wrap=True, highlight=False)
        reporting.print_results_table(results["table"], title="Evaluation", console=console)
    return results


if __name__ == "__main__":
    run_command(evaluate)
