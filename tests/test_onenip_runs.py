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
from tests import fake_trees
from tests.runs import DDP_BF16, REPO, assert_onnx_export_matches, assert_reevaluation_is_exact, run_script

pytestmark = pytest.mark.slow


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
    run_script("train.py", *tiny_onenip_args(layout, root, tmp_path / "runs", *DDP_BF16))
    run_dir = tmp_path / "runs" / "onenip"
    ddp = json.loads((run_dir / "metrics.json").read_text())
    assert set(ddp["per_category"]) == categories  # one model for every category
    assert ddp["run"]["test_images"] == test_images
    assert ddp["run"]["prompt_pool"]["categories"] == sorted(categories)
    assert 0.0 <= ddp["run"]["prompt_category_accuracy"] <= 1.0
    checkpoint = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["model.prompt_features"].shape[0] == len(categories)
    assert np.isfinite(float(checkpoint["state_dict"]["model.fusion_scale"]))

    single = assert_reevaluation_is_exact(run_dir, tmp_path / "one")
    assert single["run"]["prompt_category_accuracy"] == pytest.approx(ddp["run"]["prompt_category_accuracy"])
    if layout == "embedded":  # the exported graph of the trained checkpoint scores images as PyTorch does
        assert_onnx_export_matches(run_dir / "checkpoints" / "final.ckpt", tmp_path / "onenip.onnx", 64)


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
