"""Evaluate a trained checkpoint in a fresh process.

    python evaluate.py --checkpoint runs/<run>/checkpoints/final.ckpt [--output_dir DIR] [--data.root ...]

Rebuilds the datamodule and detector from the run's saved config.yaml (any extra argument overrides
it, e.g. another ``--data.categories``), loads every weight and fitted statistic from the checkpoint,
tests, and writes metrics.json, scores.csv and maps/ into DIR (default ``<run>/evaluate``).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from lightning_modules import reporting
from lightning_modules.cli import AnomalyCLI, run_command
from lightning_modules.resume import read_checkpoint


def _override_args(config_path: Path) -> list[str]:
    """Init-arg overrides that stop the detector from looking up weights the checkpoint already holds."""
    config = yaml.safe_load(config_path.read_text())
    module_name, class_name = config["model"]["class_path"].rsplit(".", 1)
    detector = getattr(importlib.import_module(module_name), class_name)
    return [f"--model.init_args.{key}={'null' if value is None else value}"
            for key, value in detector.checkpoint_init_overrides.items()]


def evaluate(args: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--config", type=Path, default=None, help="default: <run>/config.yaml beside checkpoints/")
    parser.add_argument("--output_dir", type=Path, default=None, help="default: <run>/evaluate")
    known, overrides = parser.parse_known_args(args)
    if not known.checkpoint.is_file():
        raise SystemExit(f"evaluate.py: checkpoint {known.checkpoint} does not exist")
    run_dir = known.checkpoint.resolve().parent.parent
    config = known.config or run_dir / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"evaluate.py: no config {config}; pass --config with the training config")
    output_dir = known.output_dir or run_dir / "evaluate"
    cli = AnomalyCLI(args=["--config", str(config), *_override_args(config), "--wandb.mode=disabled",
                           "--trainer.logger=false", *overrides, f"--run.dir={output_dir}", "--run.resume=false"])
    cli.datamodule.prepare_data()
    cli.datamodule.setup("test")  # a bad dataset fails before the checkpoint is loaded
    read_checkpoint(known.checkpoint)  # an unreadable checkpoint fails with its path named
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(known.checkpoint), verbose=False)
    results = cli.model.test_results or {}
    if cli.trainer.is_global_zero and results:
        reporting.print_results_table(results["table"], title=f"Evaluation — {known.checkpoint}", console=Console())
    return results


if __name__ == "__main__":
    run_command(evaluate)
