"""DDP on two CPU processes (gloo) on each kind of layout, and on splits smaller than the process count.

Each case trains and tests with `--trainer.devices=2 --trainer.strategy=ddp` in a fresh process, then
evaluates the same final checkpoint on one process: every metric must agree to 1e-6, and every
test image must be scored exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluate import evaluate
from tests import fake_trees
from tests.runs import REPO, assert_same_metrics, run_script

pytestmark = pytest.mark.slow
DDP = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")


def tiny_args(layout: str, root: Path, category: str, output_root: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs/quickstart_weights_free.yaml"), f"--data.layout={layout}",
        f"--data.root={root}", f"--data.categories={category}", "--model.init_args.backbone=resnet18",
        "--model.init_args.pretrained=false", "--model.init_args.frn_hidden_scale=0.25", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--wandb.mode=disabled",
        f"--run.output_root={output_root}", "--run.name=ddp", *extra,
    ]


def make_case(case: str, tmp_path: Path) -> tuple[str, Path, str, int]:
    """(layout, root, category, number of test images)."""
    if case == "mvtec_ad":  # 12 train + 2 validation; 3 good + 3 defective test images with masks
        return "mvtec_ad", fake_trees.make_mvtec_ad(tmp_path / "data", ("bottle",), n_train=14, n_test_good=3), \
            "bottle", 6
    if case == "folder":  # mixed file types; a defect with masks and one without (label only)
        root = fake_trees.make_folder(tmp_path / "data")
        fake_trees.write_images(root / "widget" / "train" / "good", 8, seed=20)  # ULSAD's BN needs 2 per process
        return "folder", root, "widget", 4
    # One validation image and one test image: the second process has none of either.
    root = fake_trees.make_mvtec_ad(tmp_path / "data", ("bottle",), n_train=7, n_test_good=0, defects={"crack": 1})
    return "mvtec_ad", root, "bottle", 1


@pytest.mark.parametrize("case", ["mvtec_ad", "folder", "one_image_splits"])
def test_ddp_train_and_test_then_one_process_evaluation_agrees(case, tmp_path):
    layout, root, category, test_images = make_case(case, tmp_path)
    run_script("train.py", *tiny_args(layout, root, category, tmp_path / "runs", *DDP))
    run_dir = tmp_path / "runs" / "ddp"
    assert not (tmp_path / "runs" / "ddp_v2").exists()  # both processes wrote into one run folder
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert ddp["run"]["test_images"] == test_images  # each image once: no padding, none dropped
    assert len((run_dir / "scores.csv").read_text().splitlines()) == 1 + test_images

    # The run's config.yaml says devices: 2 / ddp; this evaluation is explicitly one process.
    evaluate(["--checkpoint", str(run_dir / "checkpoints" / "final.ckpt"), "--output_dir", str(tmp_path / "one"),
              "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.enable_progress_bar=false"])
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert single["run"]["test_images"] == test_images
    assert assert_same_metrics(ddp, single) >= (7 if case == "mvtec_ad" else 0)
    for branch in ("local", "global"):  # one calibration, on both validation shards
        assert ddp["run"]["map_quantiles"][branch] == pytest.approx(single["run"]["map_quantiles"][branch])
