"""Synthetic anomalies: exact masks, the papers' geometry, the DRAEM blend, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.synthesis import (
    CutPaste,
    EitherSynthesis,
    PerlinAnomaly,
    build_synthesis,
    onenip_synthesis,
    perlin_noise,
    procedural_texture,
)
from tests import fake_trees


def image(seed: int = 0, size: int = 64) -> np.ndarray:
    return fake_trees.random_rgb(seed, size, size).astype(np.float32) / 255.0


@pytest.fixture
def texture_dir(tmp_path):
    folder = tmp_path / "dtd" / "images" / "banded"
    fake_trees.write_image(folder / "a.jpg", fake_trees.random_rgb(1, 48, 40))
    fake_trees.write_image(folder / "b.png", fake_trees.random_rgb(2, 20, 20))
    return tmp_path / "dtd"


SYNTHESES = {
    "cutpaste": lambda _: CutPaste("normal"),
    "scar": lambda _: CutPaste("scar"),
    "3way": lambda _: CutPaste("3way"),
    "perlin_procedural": lambda _: PerlinAnomaly(),
    "perlin_textures": lambda texture_dir: PerlinAnomaly(texture_dir=texture_dir),
    "onenip_hybrid": lambda texture_dir: onenip_synthesis(texture_dir),
}


@pytest.mark.parametrize("name", SYNTHESES)
def test_mask_is_exactly_the_changed_pixels(name, texture_dir):
    synthesis = SYNTHESES[name](texture_dir)
    for seed in range(12):
        original = image(seed)
        before = original.copy()
        altered, mask = synthesis(original, np.random.default_rng(seed))
        assert np.array_equal(original, before)  # input untouched
        assert altered.shape == original.shape and altered.dtype == np.float32
        assert mask.shape == original.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0} and mask.sum() > 0
        outside = mask == 0
        assert np.array_equal(altered[outside], original[outside])  # bit-identical outside
        inside_changed = np.any(altered != original, axis=2)[mask == 1]
        assert inside_changed.mean() > 0.9
        assert 0.0 <= altered.min() and altered.max() <= 1.0


@pytest.mark.parametrize("name", SYNTHESES)
def test_seeded_reproducibility(name, texture_dir):
    synthesis = SYNTHESES[name](texture_dir)
    first = synthesis(image(), np.random.default_rng(5))
    again = synthesis(image(), np.random.default_rng(5))
    other = synthesis(image(), np.random.default_rng(6))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_cutpaste_normal_patch_geometry():
    """Li et al.: area ratio in [0.02, 0.15] and aspect ratio in [0.3, 1/0.3] of one rectangle."""
    synthesis = CutPaste("normal")
    aspects = []
    for seed in range(40):
        _, mask = synthesis(image(seed, 100), np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert mask.sum() >= 0.95 * height * width  # a filled axis-aligned rectangle
        assert 0.017 <= height * width / 100**2 <= 0.16
        aspects.append(width / height)
    assert 0.28 <= min(aspects) and max(aspects) <= 1 / 0.28
    assert min(aspects) < 0.7 and max(aspects) > 1.4  # both orientations occur


def test_scar_size_scales_with_the_image():
    def mean_area(size: int) -> float:
        synthesis = CutPaste("scar")
        areas = [synthesis(image(s, size), np.random.default_rng(s))[1].sum() for s in range(30)]
        return float(np.mean(areas))

    small, large = mean_area(256), mean_area(512)
    # width 2..16 x length 10..25 px at 256 px: mean area about 9 * 17.5 = 158
    assert 80 < small < 260
    assert 3.0 < large / small < 5.0  # area grows with the square of the side


def test_scar_is_rotated():
    synthesis = CutPaste("scar")
    fills = []
    for seed in range(20):
        _, mask = synthesis(image(seed, 256), np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        fills.append(mask.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1)))
    assert min(fills) < 0.8  # a rotated rectangle does not fill its bounding box


def test_perlin_blend_follows_the_draem_formula(tmp_path):
    """A constant texture stays constant under the texture augmentations, so inside the mask
    out = (1 - beta) * c + beta * image: a line in the image value with slope beta."""
    fake_trees.write_image(tmp_path / "flat" / "t.png", np.full((16, 16, 3), 90, np.uint8))
    synthesis = PerlinAnomaly(texture_dir=tmp_path / "flat", beta_range=(0.3, 0.6))
    for seed in range(5):
        original = image(seed)
        altered, mask = synthesis(original, np.random.default_rng(seed))
        inside = mask == 1
        for channel in range(3):
            x, y = original[..., channel][inside], altered[..., channel][inside]
            slope, intercept = np.polyfit(x, y, 1)
            assert 0.3 - 1e-3 <= slope <= 0.6 + 1e-3
            assert np.abs(y - (slope * x + intercept)).max() < 1e-4


def test_perlin_mask_is_thresholded_smooth_noise():
    synthesis = PerlinAnomaly(threshold=0.5)
    masks = [synthesis(image(s), np.random.default_rng(s))[1] for s in range(10)]
    coverage = [m.mean() for m in masks]
    assert 0.0 < min(coverage) and max(coverage) < 0.6


def test_perlin_noise_any_shape_is_smooth_and_centred():
    rng = np.random.default_rng(0)
    noise = perlin_noise(37, 23, (4, 2), rng)
    assert noise.shape == (37, 23) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.0
    assert np.abs(np.diff(noise, axis=0)).max() < 0.35 and np.abs(np.diff(noise, axis=1)).max() < 0.35
    many = np.stack([perlin_noise(32, 32, (4, 4), np.random.default_rng(s)) for s in range(30)])
    assert abs(many.mean()) < 0.05 and 0.1 < many.std() < 0.5
    assert np.array_equal(perlin_noise(37, 23, (4, 2), np.random.default_rng(0)), noise)


def test_procedural_texture_range():
    textures = [procedural_texture(24, 40, np.random.default_rng(s)) for s in range(6)]
    for texture in textures:
        assert texture.shape == (24, 40, 3) and texture.dtype == np.float32
        assert 0.0 <= texture.min() and texture.max() <= 1.0 and texture.std() > 0.01


def test_texture_dir_errors_and_fallback(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=f"texture_dir {tmp_path / 'missing'} does not exist"):
        PerlinAnomaly(texture_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    synthesis = PerlinAnomaly(texture_dir=tmp_path / "empty")
    assert "holds no images" in caplog.text
    _, mask = synthesis(image(), np.random.default_rng(0))
    assert mask.sum() > 0


def test_texture_files_are_found_recursively(texture_dir):
    assert [p.name for p in PerlinAnomaly(texture_dir=texture_dir).texture_files] == ["a.jpg", "b.png"]


def test_build_synthesis_names(texture_dir):
    assert build_synthesis(None) is None and build_synthesis("none") is None
    assert [build_synthesis(n).mode for n in ("cutpaste", "cutpaste_scar", "cutpaste_3way")] == [
        "normal",
        "scar",
        "3way",
    ]
    perlin = build_synthesis("perlin", texture_dir=str(texture_dir))
    assert isinstance(perlin, PerlinAnomaly) and len(perlin.texture_files) == 2
    with pytest.raises(ValueError, match="unknown synthesis 'draem'.*cutpaste_3way, perlin"):
        build_synthesis("draem")
    with pytest.raises(ValueError, match="mode must be normal, scar or 3way"):
        CutPaste("big")


def test_onenip_hybrid_draws_cutpaste_and_perlin_half_each(texture_dir):
    """OneNIP (spec §6): CutPaste or Perlin with probability 0.5 each, chosen from the image's own rng."""
    synthesis = build_synthesis("cutpaste_or_perlin", texture_dir=str(texture_dir))
    assert isinstance(synthesis, EitherSynthesis) and synthesis.probabilities == [0.5, 0.5]
    cutpaste, perlin = synthesis.choices
    assert cutpaste.mode == "3way" and perlin.beta_range == (0.0, 0.8) and perlin.max_rotation == 5.0
    picks = [int(np.random.default_rng(seed).choice(2, p=[0.5, 0.5])) for seed in range(400)]
    assert 0.42 < np.mean(picks) < 0.58
    with pytest.raises(ValueError, match="one probability per choice"):
        EitherSynthesis([cutpaste], [0.4])
