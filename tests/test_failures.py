"""Nothing silently wrong: a diverged training stops at once, and non-finite maps or scores never become
metrics. Each case was reproduced as a failure first (issue 7: NaN from step 2, every epoch still run, a
NaN final.ckpt saved, and on label-only data an exit code 0 with metrics computed from NaN scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate import evaluate
from lightning_modules.base import NonFiniteResults, TrainingDiverged
from tests import fake_trees
from tests.runs import REPO, tiny_ulsad_args
from train import train

pytestmark = pytest.mark.slow


def label_only_folder(root: Path) -> Path:
    """A `folder`-layout category without any ground truth: only image metrics exist."""
    base = root / "widget"
    fake_trees.write_images(base / "train" / "good", 10, seed=1)
    fake_trees.write_images(base / "test" / "good", 3, seed=30)
    fake_trees.write_images(base / "test" / "stain", 3, seed=40)
    return root


@pytest.mark.parametrize("layout", ["embedded", "folder"])
def test_a_diverging_run_stops_at_once_and_writes_no_results(layout, embedded_root, tmp_path):
    data = ([] if layout == "embedded" else
            ["--data.layout=folder", f"--data.root={label_only_folder(tmp_path / 'data')}", "--data.categories=widget"])
    args = tiny_ulsad_args(embedded_root, tmp_path, "--model.init_args.lr=1e20", "--trainer.max_epochs=3",
                           "--run.name=diverged", *data)
    with pytest.raises(TrainingDiverged, match=r"Training diverged at step [12] \(epoch [01]\): loss_\w+"):
        train(args)
    run = tmp_path / "diverged"
    assert not (run / "checkpoints" / "final.ckpt").exists() and not (run / "metrics.json").exists()
    assert not (run / "scores.csv").exists()


def test_the_command_line_exits_non_zero_with_one_clear_message(embedded_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "train.py", *tiny_ulsad_args(embedded_root, tmp_path, "--model.init_args.lr=1e20")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode != 0
    assert "Training diverged at step" in result.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("final.ckpt"))


def test_the_loss_check_names_the_step_and_every_bad_term():
    from lightning_modules.ulsad import ULSAD

    detector = ULSAD(backbone="resnet18", pretrained=False, image_size=128, frn_hidden_scale=0.25)
    fine = {"loss_local": torch.tensor(1.0), "loss_global": torch.tensor(2.0)}
    assert float(detector.total_loss(fine)) == 3.0
    with pytest.raises(TrainingDiverged, match=r"step 0 \(epoch 0\): loss_global, loss_tie are not finite "
                                               r"\(loss_local=1, loss_global=nan, loss_tie=inf\)"):
        detector.total_loss({**fine, "loss_global": torch.tensor(float("nan")), "loss_tie": torch.tensor(float("inf"))})


def test_non_finite_maps_never_become_metrics(embedded_root, tmp_path):
    """A checkpoint whose weights hold a NaN: evaluation refuses, naming the images, and writes no metrics."""
    results = train(tiny_ulsad_args(embedded_root, tmp_path / "runs"))
    checkpoint = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)
    weight = next(key for key in checkpoint["state_dict"] if key.startswith("model.frn.") and key.endswith("weight"))
    checkpoint["state_dict"][weight][0].fill_(float("nan"))
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(NonFiniteResults, match=r"40 of 40 test images have NaN or infinite .*woven_tiles"):
        evaluate(["--checkpoint", str(broken), "--config", str(Path(results["run_dir"]) / "config.yaml"),
                  "--output_dir", str(tmp_path / "evaluation"), "--trainer.enable_progress_bar=false"])
    assert not (tmp_path / "evaluation" / "metrics.json").exists()
    assert json.loads((Path(results["run_dir"]) / "metrics.json").read_text())["run"]["test_images"] == 40


def test_an_empty_validation_split_stops_before_training(embedded_root, tmp_path, mvtec_ad_root):
    """validation_fraction=0 used to leave the map normalisation unfitted: raw maps were fused silently."""
    from datamodules.validate import DatasetError

    args = tiny_ulsad_args(embedded_root, tmp_path, "--data.layout=mvtec_ad", f"--data.root={mvtec_ad_root}",
                           "--data.categories=bottle", "--data.validation_fraction=0", "--run.name=no_validation")
    with pytest.raises(DatasetError, match=r"validation split is empty \(data.validation_fraction=0.0\)"):
        train(args)
    assert not (tmp_path / "no_validation").exists()


def test_an_uncalibrated_checkpoint_is_not_tested(embedded_root, tmp_path):
    """last.ckpt is written during training, before calibration: testing it would give meaningless maps."""
    from lightning_modules.base import NotCalibrated

    results = train(tiny_ulsad_args(embedded_root, tmp_path / "runs"))
    with pytest.raises(NotCalibrated, match="never calibrated.*test final.ckpt"):
        evaluate(["--checkpoint", str(Path(results["run_dir"]) / "checkpoints" / "last.ckpt"),
                  "--output_dir", str(tmp_path / "evaluation"), "--trainer.enable_progress_bar=false"])
    assert not (tmp_path / "evaluation" / "metrics.json").exists()


# ------------------------------------------------------------------------------ what a user reads
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("ANOMALY_LAB_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.parametrize(("bad", "says"), [
    ("--data.root=/nowhere/at/all", "dataset root /nowhere/at/all does not exist"),
    ("--data.image_size=100", "image_size must be a multiple of 64 and at least 128"),
    ("--model.init_args.image_size=256", "model.init_args.image_size=256 differs from data.image_size=128"),
])
def test_user_errors_are_one_paragraph_without_a_traceback(bad, says, tmp_path):
    args = ["train.py", "--config", "configs/quickstart_weights_free.yaml", "--data.layout=mvtec_ad",
            f"--data.root={fake_trees.make_mvtec_ad(tmp_path / 'data')}", "--model.init_args.backbone=resnet18",
            "--model.init_args.pretrained=false", f"--run.output_root={tmp_path / 'runs'}", bad]
    result = run_cli(*args)
    assert result.returncode == 1
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--debug" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder
    debug = run_cli(*args, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and says in debug.stderr


def test_one_image_size_key_sets_both_model_and_data(tmp_path, monkeypatch):
    from lightning_modules.cli import AnomalyCLI

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cli = AnomalyCLI(args=["--config", str(REPO / "configs/quickstart_weights_free.yaml"), "--data.image_size=256",
                           "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=false",
                           f"--run.output_root={tmp_path}", "--wandb.mode=disabled"])
    assert cli.model.hparams.image_size == cli.datamodule.image_size == 256
    assert cli.model.model.image_size == 256


def test_a_truncated_checkpoint_is_named_and_evaluation_leaves_no_empty_folders(embedded_root, tmp_path):
    results = train(tiny_ulsad_args(embedded_root, tmp_path / "runs"))
    final = Path(results["checkpoint"])
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    config = str(Path(results["run_dir"]) / "config.yaml")
    result = run_cli("evaluate.py", "--checkpoint", str(truncated), "--config", config,
                     "--output_dir", str(tmp_path / "broken"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{truncated}: cannot be read as a checkpoint" in result.stderr and "truncated" in result.stderr
    assert not (tmp_path / "broken" / "config.yaml").exists()  # a failed evaluation writes nothing that looks done

    evaluate(["--checkpoint", str(final), "--output_dir", str(tmp_path / "evaluation"),
              "--trainer.enable_progress_bar=false"])
    assert sorted(path.name for path in (tmp_path / "evaluation").iterdir()) == [
        "config.yaml", "curves.csv", "maps", "metrics.json", "scores.csv"]  # config.yaml: what was evaluated, how


def test_a_checkpoint_from_before_the_model_contract_is_named_not_a_key_error(tmp_path):
    from lightning_modules.prediction import load_detector
    from lightning_modules.resume import CheckpointError
    from lightning_modules.ulsad import ULSAD

    detector = ULSAD(backbone="resnet18", pretrained=False, image_size=128, frn_hidden_scale=0.125)
    old_layout = {key.replace("model.", "network.", 1): value for key, value in detector.state_dict().items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old_layout, "hyper_parameters": dict(detector.hparams),
                "detector_class": "lightning_modules.ulsad.ULSAD", "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(CheckpointError, match="written before every detector kept its networks"):
        load_detector(path)
