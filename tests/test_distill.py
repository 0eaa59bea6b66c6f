"""distill.py: a two-step distillation on generated images writes a teacher that loads into the
unpadded PDN EfficientAD uses; bad image folders fail clearly; both views share the grayscale draw."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import distill as distill_script
from distill import DistillationImages, distill
from networks.efficientad import PatchDescriptionNetwork, load_teacher_state_dict


def write_images(folder, count: int) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        sub = folder / ("a" if index % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"image_{index}.{'jpg' if index == 0 else 'png'}"
        cv2.imwrite(str(path), rng.integers(0, 256, (36 + index, 48, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def test_two_step_distillation_writes_a_teacher_that_efficientad_loads(tmp_path):
    write_images(tmp_path / "images", 4)
    out = tmp_path / "weights" / "teacher_small.pth"
    written = distill(["--images", str(tmp_path / "images"), "--size", "small", "--out", str(out),
                       "--steps", "2", "--batch_size", "2", "--image_size", "32", "--pretrained", "false",
                       "--normalization_images", "3", "--num_workers", "0", "--log_every", "1"])
    assert written == out and out.is_file()
    saved = torch.load(out, weights_only=True)
    assert saved["metadata"]["steps"] == 2 and saved["metadata"]["image_count"] == 4
    assert saved["metadata"]["target_weights"] == "random (pretrained=False)"

    teacher = PatchDescriptionNetwork("small", 384, padding=False)
    assert load_teacher_state_dict(teacher, out) == "named"
    for name, value in saved["state_dict"].items():
        assert torch.equal(teacher.state_dict()[name], value)
    with torch.no_grad():
        features = teacher(torch.rand(1, 3, 128, 128))
    assert features.shape == (1, 384, 24, 24) and torch.isfinite(features).all()


def test_missing_or_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        distill(["--images", str(tmp_path / "no_such_folder"), "--out", str(tmp_path / "t.pth"), "--pretrained", "false"])
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "deeper" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        distill(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "t.pth"), "--pretrained", "false"])
    assert not (tmp_path / "t.pth").exists()
    with pytest.raises(SystemExit):
        distill(["--images", str(tmp_path), "--out", str(tmp_path / "t.pth"), "--pretrained", "maybe"])


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_both_views_share_the_grayscale_draw_and_have_their_sizes(tmp_path, monkeypatch, probability):
    monkeypatch.setattr(distill_script, "GRAYSCALE_PROBABILITY", probability)
    dataset = DistillationImages(write_images(tmp_path, 1), image_size=32)
    target_view, student_view = dataset[0]
    assert target_view.shape == (3, 64, 64) and student_view.shape == (3, 32, 32)
    for view in (target_view, student_view):
        is_gray = torch.allclose(view[0], view[1], atol=1e-6) and torch.allclose(view[1], view[2], atol=1e-6)
        assert is_gray == (probability == 1.0)
