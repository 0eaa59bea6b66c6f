"""Helpers for tests that run train.py / evaluate.py: a seconds-long ULSAD command line, running a script in a
fresh process, and comparing two metrics.json files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_ulsad_args(embedded_root: Path, output_root: Path, *extra: str) -> list[str]:
    """The weights-free quickstart config shrunk to seconds: resnet18 features, a narrow FRN, 3 steps an epoch."""
    return [
        "--config", str(REPO / "configs/quickstart_weights_free.yaml"),
        f"--data.root={embedded_root}", "--data.categories=woven_tiles",
        "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=false",
        "--model.init_args.frn_hidden_scale=0.25",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--wandb.mode=disabled", f"--run.output_root={output_root}",
        *extra,
    ]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def assert_same_metrics(first: dict, second: dict, tolerance: float = 1e-6) -> int:
    """Every metric of two metrics.json files equal to `tolerance`; returns how many were compared."""
    def rows(metrics):
        yield from ((("mean", subset), values) for subset, values in metrics["mean"].items())
        for category, subsets in metrics["per_category"].items():
            yield from (((category, subset), values) for subset, values in subsets.items())

    first_rows, second_rows = dict(rows(first)), dict(rows(second))
    assert first_rows.keys() == second_rows.keys()
    compared = 0
    for key, values in first_rows.items():
        for metric, value in values.items():
            other = second_rows[key][metric]
            if value is None:
                assert other is None, (key, metric)
                continue
            assert math.isclose(value, other, abs_tol=tolerance), (key, metric, value, other)
            compared += 1
    return compared
