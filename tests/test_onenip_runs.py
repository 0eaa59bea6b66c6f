"""OneNIP through train.py / evaluate.py / export.py: one unified model over several categories, trained on two
DDP processes in bf16 on two dataset layouts, re-evaluated exactly in a fresh process, and exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.datamodule import AnomalyDataModule
from datamodules.dataset import AnomalyDataset
from lightning_modules.reporting import read_scores_csv
from tests import fake_trees
from tests.runs import REPO, assert_same_metrics, run_script

pytestmark = pytest.mark.slow
DDP = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=bf16-mixed")


def tiny_onenip_args(layout: str, root: Path, output_root: Path, *extra: str) -> list[str]:
    """configs/onenip/quickstart.yaml shrunk to seconds: a narrow one-layer transformer, 64 px, 3 steps."""
    return [
        "--config", str(REPO / "configs/onenip/quickstart.yaml"), f"--data.layout={layout}", f"--data.root={root}",
        "--data.categories=all", "--data.image_size=64", "--data.train_batch_size=4",
        "--model.init_args.hidden_dim=32", "--model.init_args.heads=4", "--model.init_args.ffn_dim=64",
        "--model.init_args.encoder_layers=1", "--model.init_args.decoder_layers=1",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--wandb.mode=disabled", f"--run.output_root={output_root}",
        "--run.name=onenip", *extra,
    ]


def test_training_items_carry_a_prompt_of_the_same_category(embedded_root):
    datamodule = AnomalyDataModule(layout="embedded", root=str(embedded_root), image_size=64)
    datamodule.request_training_fields(("prompt_image",))
    loader = datamodule.train_dataloader()
    dataset: AnomalyDataset = loader.dataset
    seen_self, categories = 0, set()
    torch.manual_seed(0)
    for index in range(0, len(dataset), 7):
        item = dataset[index]
        prompt = int(item["prompt_index"])
        assert dataset.records[prompt].category == item["category"]
        expected = dataset[prompt]["image"]  # un-augmented: the prompt image is the training image itself
        torch.testing.assert_close(item["prompt_image"], expected)
        seen_self += prompt == index
        categories.add(item["category"])
    assert categories == {"parts_tray", "woven_tiles"}
    assert "prompt_image" not in AnomalyDataset(dataset.records, 64, train=True)[0]
    with pytest.raises(ValueError, match="cannot serve training fields \\['depth'\\]"):
        datamodule.request_training_fields(("depth",))


@pytest.mark.parametrize("layout", ["embedded", "mvtec_ad"])
def test_ddp_bf16_training_then_exact_single_process_evaluation(layout, embedded_root, tmp_path):
    if layout == "embedded":
        root, categories, test_images = embedded_root, {"parts_tray", "woven_tiles"}, 100
    else:
        root = fake_trees.make_mvtec_ad(tmp_path / "data", ("bottle", "cable"), n_train=12, n_test_good=3)
        categories, test_images = {"bottle", "cable"}, 12
    run_script("train.py", *tiny_onenip_args(layout, root, tmp_path / "runs", *DDP))
    run_dir = tmp_path / "runs" / "onenip"
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert set(ddp["per_category"]) == categories  # one model for every category
    assert ddp["run"]["test_images"] == test_images
    assert ddp["run"]["prompt_pool"]["categories"] == sorted(categories)
    assert 0.0 <= ddp["run"]["prompt_category_accuracy"] <= 1.0
    checkpoint = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["model.prompt_features"].shape[0] == len(categories)
    assert np.isfinite(float(checkpoint["state_dict"]["model.fusion_scale"]))

    run_script("evaluate.py", "--checkpoint", str(run_dir / "checkpoints" / "final.ckpt"),
               "--output_dir", str(tmp_path / "one"), "--trainer.devices=1", "--trainer.strategy=auto")
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert assert_same_metrics(ddp, single) >= 7
    assert single["run"]["prompt_category_accuracy"] == pytest.approx(ddp["run"]["prompt_category_accuracy"])
    first = {row["path"]: row["score"] for row in read_scores_csv(run_dir / "scores.csv")}
    second = {row["path"]: row["score"] for row in read_scores_csv(tmp_path / "one" / "scores.csv")}
    assert first.keys() == second.keys() and max(abs(first[p] - second[p]) for p in first) <= 1e-6

    if layout == "embedded":  # the exported graph scores images alone, as PyTorch does
        import onnxruntime

        from export import export_model
        from lightning_modules.prediction import load_detector

        detector = load_detector(run_dir / "checkpoints" / "final.ckpt")
        path = export_model(detector.model, tmp_path / "onenip.onnx", "onnx")
        images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = detector.model(images)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        anomaly_map, image_score = session.run(None, {"images": images.numpy()})
        np.testing.assert_allclose(image_score, expected.image_score.numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(anomaly_map - expected.anomaly_map.numpy()).max() <= 1e-4 * float(expected.anomaly_map.max())


def test_label_selection_needs_the_category_and_is_refused_for_folder_prediction(embedded_root, tmp_path):
    from lightning_modules.prediction import load_detector, predict_folder

    run_script("train.py", *tiny_onenip_args("embedded", embedded_root, tmp_path / "runs",
                                             "--model.init_args.prompt_selection=label"))
    run_dir = tmp_path / "runs" / "onenip"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["prompt_selection"] == "label"
    assert metrics["run"]["prompt_category_accuracy"] == 1.0  # the label picks the category's own prompt
    detector = load_detector(run_dir / "checkpoints" / "final.ckpt")
    with pytest.raises(ValueError, match="category_index"):
        predict_folder(detector, embedded_root / "woven_tiles" / "test", tmp_path / "out")
