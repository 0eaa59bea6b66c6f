"""PUAD: the Mahalanobis scorer against a direct numpy computation, the documented score of each
score_mode, and one end-to-end run (train → calibrate → test → evaluate in a fresh CLI) whose
scores, including the unpicturable branch, are reproduced from the checkpoint alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from lightning_modules.puad import PUAD
from lightning_modules.reporting import read_scores_csv
from networks.anomaly_model import FittedSettingsMismatch
from networks.puad import MahalanobisScorer

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def gaussian_samples(count: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(100).normal(size=(dim, dim)) / math.sqrt(dim)  # correlated features
    return rng.normal(size=(count, dim)) @ mixing + shift


# ------------------------------------------------------------------------------------ scorer
def test_mahalanobis_scorer_matches_ledoit_wolf_pinv_quadratic_form():
    train, test = gaussian_samples(200, 16, seed=0), gaussian_samples(50, 16, seed=1)
    scorer = MahalanobisScorer(16)
    assert not scorer.is_fitted
    scorer.fit(torch.from_numpy(train).float())
    assert scorer.is_fitted

    train32 = torch.from_numpy(train).float().double().numpy()  # the scorer saw float32 features
    estimate = LedoitWolf().fit(train32)
    precision = np.linalg.pinv(estimate.covariance_)
    centred = test - train32.mean(axis=0)
    expected = np.sqrt(np.maximum(0.0, np.sum((centred @ precision) * centred, axis=1)))
    scores = scorer(torch.from_numpy(test)).double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5)

    restored = MahalanobisScorer(16)
    restored.load_state_dict(scorer.state_dict())
    assert torch.equal(restored(torch.from_numpy(test)), scorer(torch.from_numpy(test)))


def test_mahalanobis_scorer_ranks_a_shifted_gaussian_above_normal_samples():
    scorer = MahalanobisScorer(32)
    scorer.fit(torch.from_numpy(gaussian_samples(300, 32, seed=2)))
    normal = scorer(torch.from_numpy(gaussian_samples(200, 32, seed=3))).numpy()
    shifted = scorer(torch.from_numpy(gaussian_samples(200, 32, seed=4, shift=0.5))).numpy()
    labels = np.r_[np.zeros(len(normal)), np.ones(len(shifted))]
    assert roc_auc_score(labels, np.r_[normal, shifted]) > 0.95


def test_mahalanobis_scorer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N×8"):
        MahalanobisScorer(8).fit(torch.zeros(10, 7))
    with pytest.raises(ValueError, match="at least 2"):
        MahalanobisScorer(8).fit(torch.zeros(1, 8))


# ------------------------------------------------------------------------------------ score modes
@pytest.fixture(scope="module")
def fitted_puad() -> PUAD:
    torch.manual_seed(0)
    detector = PUAD(teacher_pretrained=False, image_size=SIZE)
    model = detector.model
    detector.fit_training_statistics([{"image": torch.rand(2, 3, SIZE, SIZE)}])
    model.map_quantiles.copy_(torch.tensor([2.0, 3.0, 0.01, 0.02]))
    with torch.no_grad():
        train_features = model.student(torch.rand(16, 3, SIZE, SIZE))[:, :384].float().mean(dim=(2, 3))
    model.scorer.fit(train_features)
    model.score_statistics.copy_(torch.tensor([0.05, 0.02, 20.0, 4.0], dtype=torch.float64))
    return detector.eval()


@pytest.mark.parametrize("feature_source", ["student", "teacher"])
def test_each_score_mode_gives_its_documented_score(fitted_puad, feature_source):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    model = fitted_puad.model
    model.feature_source = feature_source
    with torch.no_grad():
        teacher = (model.teacher(images) - model.teacher_mean) / model.teacher_std
        student = model.student(images)
        autoencoder = model.autoencoder(images)
        st = ((teacher - student[:, :384]) ** 2).mean(1, keepdim=True)
        ae = ((autoencoder - student[:, 384:]) ** 2).mean(1, keepdim=True)
        st, ae = (F.interpolate(m, size=SIZE, mode="bilinear") for m in (st, ae))
        combined_map = 0.5 * 0.1 * (st - 2.0) / (3.0 - 2.0) + 0.5 * 0.1 * (ae - 0.01) / (0.02 - 0.01)
        efficientad_score = combined_map.amax(dim=(1, 2, 3))
        pooled = (student[:, :384] if feature_source == "student" else teacher).mean(dim=(2, 3))
        distance = model.scorer(pooled)
        expected = {
            "picturable": efficientad_score,
            "unpicturable": distance,
            "combined": (efficientad_score - 0.05) / 0.02 + (distance - 20.0) / 4.0,
        }
        try:
            _, every_mode = model.scores_of_every_mode(images)
            for mode, score in expected.items():
                model.score_mode = mode
                output = model(images)
                assert torch.allclose(output.anomaly_map, combined_map, rtol=1e-4, atol=1e-5), mode
                assert torch.allclose(output.image_score, score.float(), rtol=1e-4, atol=1e-4), mode
                assert torch.allclose(every_mode[mode], score.float(), rtol=1e-4, atol=1e-4), mode
        finally:
            model.score_mode = "combined"
            model.feature_source = "student"
    assert not torch.allclose(expected["picturable"], expected["unpicturable"])


def test_unfitted_puad_is_not_calibrated_and_testing_refuses_it():
    from lightning_modules.base import NotCalibrated

    detector = PUAD(teacher_pretrained=False, image_size=SIZE).eval()
    assert not detector.model.statistics_fitted() and not detector.is_calibrated()
    with pytest.raises(NotCalibrated, match="never calibrated"):
        detector.on_test_epoch_start()
    with pytest.raises(ValueError, match="score_mode"):
        PUAD(teacher_pretrained=False, image_size=SIZE, score_mode="both")
    with pytest.raises(ValueError, match="feature_source"):
        PUAD(teacher_pretrained=False, image_size=SIZE, feature_source="autoencoder")


# ------------------------------------------------------------------------------------ end to end
def _flat_metrics(metrics: dict) -> dict[str, float]:
    flat = {}
    for category, subsets in metrics["per_category"].items():
        for subset, values in subsets.items():
            flat.update({f"{category}/{subset}/{name}": value for name, value in values.items()})
    for subset, values in metrics["mean"].items():
        flat.update({f"mean/{subset}/{name}": value for name, value in values.items()})
    return flat


def _scores(path: Path) -> np.ndarray:
    """The scores of a scores.csv, ordered by image path."""
    rows = sorted(read_scores_csv(path), key=lambda row: row["path"])
    return np.array([row["score"] for row in rows])


@pytest.mark.slow
def test_train_then_evaluate_reproduces_every_metric_and_each_score_branch(tmp_path):
    from datamodules.embedded import SplitCounts, generate_embedded_dataset
    from evaluate import evaluate
    from train import train

    root = generate_embedded_dataset(tmp_path / "embedded", seed=0, image_size=SIZE,
                                     counts=SplitCounts(train=12, validation=6, test_good=6, test_structural=6,
                                                        test_logical=8))
    results = train([
        "--config", str(REPO / "configs/puad/quickstart.yaml"), "--data.layout=mvtec_loco", f"--data.root={root}",
        "--data.categories=parts_tray", "--trainer.max_steps=3", "--data.train_batch_size=4",
        "--data.eval_batch_size=5", "--wandb.mode=disabled", f"--run.output_root={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
    ])
    run_dir = Path(results["run_dir"])
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= trained["mean"]["all"]["image_AUROC"] <= 1.0
    assert {"logical", "structural"} <= set(trained["per_category"]["parts_tray"])
    info = trained["run"]
    assert info["gaussian_fitted"] and info["score_statistics_fitted"] and info["map_quantiles_fitted"]
    assert info["gaussian_fit_images"] == 12  # the train split, not validation (spec §6.2)
    assert info["penalty"] == "off" and info["score_mode"] == "combined"

    checkpoint = str(run_dir / "checkpoints" / "final.ckpt")
    evaluate(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "combined"),
              "--trainer.enable_progress_bar=false"])
    reproduced = json.loads((tmp_path / "combined" / "metrics.json").read_text())
    expected, actual = _flat_metrics(trained), _flat_metrics(reproduced)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(actual[key])) or abs(value - actual[key]) <= 1e-6, key
    train_scores = _scores(run_dir / "scores.csv")
    assert np.abs(train_scores - _scores(tmp_path / "combined" / "scores.csv")).max() <= 1e-6

    branches, thresholds = {}, {}
    for mode in ("picturable", "unpicturable"):
        evaluate(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / mode),
                  f"--model.init_args.score_mode={mode}", "--trainer.enable_progress_bar=false"])
        branches[mode] = _scores(tmp_path / mode / "scores.csv")
        run = json.loads((tmp_path / mode / "metrics.json").read_text())["run"]
        assert run["score_mode"] == mode
        # Each mode has its own decision threshold (fitted on the validation images), and the labels use it.
        threshold = run["decision_threshold"]["image_threshold"]
        thresholds[mode] = threshold
        rows = read_scores_csv(tmp_path / mode / "scores.csv")
        assert [row["predicted_label"] for row in rows] == [int(row["score"] > threshold) for row in rows]
    thresholds["combined"] = info["decision_threshold"]["image_threshold"]
    assert len(set(thresholds.values())) == 3
    statistics = info["score_statistics"]
    z_efficientad = (branches["picturable"] - statistics["efficientad"]["mean"]) / statistics["efficientad"]["std"]
    z_mahalanobis = (branches["unpicturable"] - statistics["mahalanobis"]["mean"]) / statistics["mahalanobis"]["std"]
    np.testing.assert_allclose(z_efficientad + z_mahalanobis, train_scores, rtol=1e-5, atol=1e-5)
    assert not np.allclose(branches["picturable"], branches["unpicturable"])

    # The Gaussian was fitted on student features: reading it with teacher features is refused, not silently
    # scored (it used to give distances ~10x larger).
    with pytest.raises(FittedSettingsMismatch, match=r"feature_source='student' in the checkpoint but 'teacher' now"):
        evaluate(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "teacher"),
                  "--model.init_args.feature_source=teacher", "--trainer.enable_progress_bar=false"])

    # --recalibrate: the same trained networks, every statistic fitted again on the training and held-out normal
    # images (never the test images). With the checkpoint's own settings it reproduces the run exactly; with
    # teacher features it re-fits the Gaussian and scores the same model the other way (PUAD Table 1's comparison).
    evaluate(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "refit"), "--recalibrate",
              "--trainer.enable_progress_bar=false"])
    refit = _flat_metrics(json.loads((tmp_path / "refit" / "metrics.json").read_text()))
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(refit[key])) or abs(value - refit[key]) <= 1e-6, key
    assert np.abs(train_scores - _scores(tmp_path / "refit" / "scores.csv")).max() <= 1e-5
    evaluate(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "teacher"), "--recalibrate",
              "--model.init_args.feature_source=teacher", "--trainer.enable_progress_bar=false"])
    teacher = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["run"]
    assert teacher["feature_source"] == "teacher" and teacher["gaussian_fit_images"] == 12
    assert not np.allclose(_scores(tmp_path / "teacher" / "scores.csv"), train_scores)
    config = yaml.safe_load((tmp_path / "teacher" / "config.yaml").read_text())
    assert config["model"]["init_args"]["feature_source"] == "teacher"  # the report reads the setting from here

    # The study flow of sweeps/puad_table1.yaml on this run: rescore.py scores it again in another score mode (not
    # its own, which its metrics.json already is), and report.py puts both in PUAD Table 1's rows.
    from rich.console import Console

    from sweeps import report, rescore

    values = {"model.init_args.score_mode": ["combined", "picturable"], "model.init_args.feature_source": ["student"]}
    assert rescore.rescore(tmp_path / "runs", values, console=Console(record=True)) == \
        {"done": 1, "skipped": 1, "failed": 0}
    rescored = run_dir / "rescored" / "score_mode=picturable,feature_source=student"
    assert np.abs(_scores(rescored / "scores.csv") - branches["picturable"]).max() <= 1e-6
    assert rescore.rescore(tmp_path / "runs", values, console=Console(record=True))["skipped"] == 2  # resumes
    summary = report.report(tmp_path / "runs", study=REPO / "sweeps/puad_table1.yaml", console=Console(record=True))
    assert [(row.label, row.paper["image_AUROC"]) for row in summary.rows] == [("EfficientAD-S", 89.22),
                                                                                ("PUAD-S", 93.18)]
    assert summary.rows[0].mean == pytest.approx(
        json.loads((rescored / "metrics.json").read_text())["mean"]["all"]["image_AUROC"], abs=1e-12)
    assert summary.rows[1].mean == pytest.approx(trained["mean"]["all"]["image_AUROC"], abs=1e-12)
