"""Helpers for tests that run train.py / evaluate.py: a seconds-long ULSAD command line, running a script in a
fresh process, comparing two metrics.json files, re-evaluating a run, and checking its ONNX export."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Two CPU processes (gloo) in bf16: how the run tests train the unified detectors.
DDP_BF16 = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=bf16-mixed")


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


def assert_reevaluation_is_exact(run_dir: Path, output_dir: Path) -> dict:
    """evaluate.py on the run's final checkpoint, on one process: every metric equal to the run's own (≤ 1e-6) and
    every image score to float32 rounding (relative 1e-5, about 80 ulps). Not bit-equal: each DDP process scored
    half the images per batch, and oneDNN picks its convolution kernel by batch size, so the backbone's features
    differ in the last bits (9e-6 on features of size 11, measured for CRAD's test network at 6 vs 12 images a
    batch on one thread, random images; 0 at equal batch sizes), and a score near 15 moved by 2.5e-5. Returns the new
    metrics.json."""
    import json

    from lightning_modules.reporting import read_scores_csv

    run_script("evaluate.py", "--checkpoint", str(run_dir / "checkpoints" / "final.ckpt"),
               "--output_dir", str(output_dir), "--trainer.devices=1", "--trainer.strategy=auto")
    original = json.loads((run_dir / "metrics.json").read_text())
    again = json.loads((output_dir / "metrics.json").read_text())
    assert assert_same_metrics(original, again) >= 7
    first = {row["path"]: row["score"] for row in read_scores_csv(run_dir / "scores.csv")}
    second = {row["path"]: row["score"] for row in read_scores_csv(output_dir / "scores.csv")}
    assert first.keys() == second.keys()
    differing = {path: (first[path], second[path]) for path in first
                 if not math.isclose(first[path], second[path], rel_tol=1e-5, abs_tol=1e-6)}
    assert not differing, differing
    return again


def assert_onnx_export_matches(checkpoint: Path, path: Path, image_size: int) -> None:
    """The checkpoint's model exported to ONNX scores 3 random images as PyTorch does (scores rtol 1e-4, maps to
    1e-4 of their maximum)."""
    import numpy as np
    import onnxruntime
    import torch

    from export import export_model
    from lightning_modules.prediction import load_detector

    detector = load_detector(checkpoint)
    exported = export_model(detector.model, path, "onnx")
    images = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    fields = detector.model.example_fields(3)  # e.g. each image's category_index, for a per-category model
    with torch.no_grad():
        expected = detector.model(images, **fields)
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy(), **{name: value.numpy() for name, value in fields.items()}}
    anomaly_map, image_score = session.run(None, feeds)
    np.testing.assert_allclose(image_score, expected.image_score.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(anomaly_map - expected.anomaly_map.numpy()).max() <= 1e-4 * float(expected.anomaly_map.max())


def assert_results_tables_whole(stdout: str) -> None:
    """The results tables as a log file holds them (rich's 80 columns off a terminal): no line over 80 characters,
    no truncated (…) header or cell, both views present."""
    tables = stdout[stdout.index("Test of "):]
    assert "…" not in tables, tables
    assert max(len(line) for line in tables.splitlines()) <= 80, tables
    for label in ("Category", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "AUPRO", "sPRO", "mean of 2"):
        assert label in tables, (label, tables)
