"""Synthetic anomalies for detectors that train on them: CutPaste and DRAEM-style Perlin blends.

Both are callables `(image H x W x 3 float32 in [0, 1], rng: np.random.Generator) -> (image, mask)`.
The mask is exact: it is 1 on precisely the pixels whose value changed and 0 elsewhere, where the
output is bit-identical to the input. All randomness comes from `rng` (albumentations transforms
are handed the same generator), so a seeded rng reproduces the anomaly.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from datamodules.dataset import read_image, resize_image
from datamodules.layouts import list_images

log = logging.getLogger(__name__)

SYNTHESIS_NAMES = ("none", "cutpaste", "cutpaste_scar", "cutpaste_3way", "perlin", "cutpaste_or_perlin")
MAX_ATTEMPTS = 10  # redraws when an anomaly changed no pixel (e.g. a patch pasted onto its copy)


def _seed_transform(transform: A.BasicTransform | A.BaseCompose, rng: np.random.Generator) -> None:
    transform.set_random_state(rng, random.Random(int(rng.integers(2**63))))


def _exact_mask(
    original: np.ndarray, altered: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the alteration inside `region` only, and mark the pixels that actually changed."""
    region = region.astype(bool)
    result = np.where(region[:, :, None], altered, original).astype(np.float32)
    changed = np.any(result != original, axis=2)
    return result, changed.astype(np.float32)


def _draw_until_visible(draw, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    result, mask = draw(image, rng)
    for _ in range(MAX_ATTEMPTS - 1):
        if mask.any():
            break
        result, mask = draw(image, rng)
    return result, mask


# ---------------------------------------------------------------------------- CutPaste


class CutPaste:
    """CutPaste (Li et al., CVPR 2021): cut a patch of the image and paste it somewhere else.

    - normal: a rectangle of area ratio U(0.02, 0.15) and aspect ratio log-uniform in
      (0.3, 1/0.3), colour-jittered;
    - scar: a thin rectangle, width U{2..16} and length U{10..25} px at 256 px (scaled with the
      image side), colour-jittered, rotated by U(-45, 45) degrees;
    - 3way: normal or scar with equal odds.
    """

    def __init__(
        self,
        mode: str = "normal",
        area_ratio: tuple[float, float] = (0.02, 0.15),
        aspect_ratio: float = 0.3,
        scar_width: tuple[int, int] = (2, 16),
        scar_length: tuple[int, int] = (10, 25),
        scar_angle: float = 45.0,
        colour_jitter: float = 0.1,
        hue_jitter: float | None = None,
    ):
        if mode not in ("normal", "scar", "3way"):
            raise ValueError(f"CutPaste mode must be normal, scar or 3way, got '{mode}'")
        self.mode = mode
        self.area_ratio = area_ratio
        self.aspect_ratio = aspect_ratio
        self.scar_width = scar_width
        self.scar_length = scar_length
        self.scar_angle = scar_angle
        self.jitter = (
            A.ColorJitter(
                brightness=colour_jitter,
                contrast=colour_jitter,
                saturation=colour_jitter,
                hue=colour_jitter if hue_jitter is None else hue_jitter,
                p=1.0,
            )
            if colour_jitter > 0
            else None
        )

    def _jitter(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.jitter is None:
            return patch
        _seed_transform(self.jitter, rng)
        return self.jitter(image=np.ascontiguousarray(patch))["image"].astype(np.float32)

    def _normal(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        area = rng.uniform(*self.area_ratio) * height * width
        aspect = math.exp(rng.uniform(math.log(self.aspect_ratio), -math.log(self.aspect_ratio)))
        patch_w = int(np.clip(round(math.sqrt(area * aspect)), 1, width))
        patch_h = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
        src_y, src_x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
        dst_y, dst_x = rng.integers(0, height - patch_h + 1), rng.integers(0, width - patch_w + 1)
        patch = self._jitter(image[src_y : src_y + patch_h, src_x : src_x + patch_w], rng)
        altered = image.copy()
        altered[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = patch
        region = np.zeros((height, width), bool)
        region[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = True
        return _exact_mask(image, altered, region)

    def _scar(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        scale = min(height, width) / 256.0
        scar_w = int(
            np.clip(round(rng.integers(self.scar_width[0], self.scar_width[1] + 1) * scale), 1, width)
        )
        scar_h = int(
            np.clip(round(rng.integers(self.scar_length[0], self.scar_length[1] + 1) * scale), 1, height)
        )
        src_y, src_x = rng.integers(0, height - scar_h + 1), rng.integers(0, width - scar_w + 1)
        patch = self._jitter(image[src_y : src_y + scar_h, src_x : src_x + scar_w], rng)

        # Rotate about the patch centre into a canvas that holds the whole rotated rectangle.
        angle = rng.uniform(-self.scar_angle, self.scar_angle)
        rotation = cv2.getRotationMatrix2D((scar_w / 2.0, scar_h / 2.0), angle, 1.0)
        cos, sin = abs(rotation[0, 0]), abs(rotation[0, 1])
        out_w = min(width, max(1, math.ceil(scar_h * sin + scar_w * cos)))
        out_h = min(height, max(1, math.ceil(scar_h * cos + scar_w * sin)))
        rotation[0, 2] += out_w / 2.0 - scar_w / 2.0
        rotation[1, 2] += out_h / 2.0 - scar_h / 2.0
        rotated = cv2.warpAffine(
            patch, rotation, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        alpha = cv2.warpAffine(
            np.ones((scar_h, scar_w), np.uint8),
            rotation,
            (out_w, out_h),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

        dst_y, dst_x = rng.integers(0, height - out_h + 1), rng.integers(0, width - out_w + 1)
        altered = image.copy()
        altered[dst_y : dst_y + out_h, dst_x : dst_x + out_w] = rotated.reshape(out_h, out_w, -1)
        region = np.zeros((height, width), bool)
        region[dst_y : dst_y + out_h, dst_x : dst_x + out_w] = alpha > 0
        return _exact_mask(image, altered, region)

    def _draw(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        mode = self.mode if self.mode != "3way" else ("normal" if rng.random() < 0.5 else "scar")
        return self._normal(image, rng) if mode == "normal" else self._scar(image, rng)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return _draw_until_visible(self._draw, np.asarray(image, np.float32), rng)


# ---------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(height: int, width: int, cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of shape (height, width) with `cells` = (rows, cols) lattice cells,
    values in about [-1, 1]. Written here with numpy because no well-kept library provides it
    (`noise`/`perlin-noise` on PyPI are per-point Python loops or unmaintained). Unlike DRAEM's
    `rand_perlin_2d_np` the size need not be a multiple of the cell count."""
    rows, cols = cells
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(rows + 1, cols + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (rows+1, cols+1, 2) as (dy, dx)
    y = (np.arange(height) + 0.5) * rows / height
    x = (np.arange(width) + 0.5) * cols / width
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]  # position inside the cell, (H,1) and (1,W)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (math.sqrt(2.0) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def _random_cells(height: int, width: int, rng: np.random.Generator, max_power: int = 6,
                  min_power: int = 0) -> tuple[int, int]:
    """DRAEM's lattice: 2**a x 2**b cells with a, b in min_power..max_power-1 (DRAEM: 0..5), at most one cell per pixel."""
    rows = min(2 ** int(rng.integers(min_power, max_power)), height)
    cols = min(2 ** int(rng.integers(min_power, max_power)), width)
    return rows, cols


def _rotate(field: np.ndarray, angle: float) -> np.ndarray:
    height, width = field.shape
    rotation = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
    return cv2.warpAffine(
        field, rotation, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _normalise(field: np.ndarray) -> np.ndarray:
    low, high = float(field.min()), float(field.max())
    return (field - low) / (high - low) if high > low else np.zeros_like(field)


def procedural_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random texture (H x W x 3 float32 in [0, 1]) when no texture folder is given: either
    Perlin noise per colour channel, or stripes of random frequency and direction between two
    random colours, with a little noise."""
    if rng.random() < 0.5:
        channels = [
            _normalise(perlin_noise(height, width, _random_cells(height, width, rng), rng)) for _ in range(3)
        ]
        return np.stack(channels, axis=-1).astype(np.float32)
    theta = rng.uniform(0.0, math.pi)
    period = rng.uniform(3.0, max(4.0, min(height, width) / 2.0))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2.0 * math.pi / period
    weight = (0.5 + 0.5 * np.sin(phase + rng.uniform(0.0, 2.0 * math.pi)))[:, :, None]
    colour_a, colour_b = rng.random(3), rng.random(3)
    texture = colour_a * (1 - weight) + colour_b * weight + rng.normal(0.0, 0.03, size=(height, width, 3))
    return np.clip(texture, 0.0, 1.0).astype(np.float32)


def _texture_augmentation() -> A.SomeOf:
    """Three of DRAEM's ten imgaug operations, as their albumentations counterparts."""
    return A.SomeOf(
        [
            A.RandomGamma(gamma_limit=(50, 200), p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.12, contrast_limit=0.2, p=1.0),
            A.Sharpen(p=1.0),
            A.HueSaturationValue(hue_shift_limit=50, sat_shift_limit=50, val_shift_limit=0, p=1.0),
            A.Solarize(threshold_range=(0.125, 0.5), p=1.0),
            A.Posterize(num_bits=(4, 7), p=1.0),
            A.HorizontalFlip(p=1.0),
            A.InvertImg(p=1.0),
            A.AutoContrast(p=1.0),
            A.Equalize(p=1.0),
        ],
        n=3,
        replace=False,
        p=1.0,
    )


class PerlinAnomaly:
    """DRAEM anomalies (Zavrtanik et al., ICCV 2021): thresholded Perlin noise selects where a
    texture is blended into the image: out = image*(1-m) + (1-beta)*texture*m + beta*image*m.

    The texture is a random file from `texture_dir` (e.g. DTD, searched recursively), resized to
    the image and augmented; with no `texture_dir` (or an empty one) it is procedural.
    """

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        beta_range: tuple[float, float] = (0.2, 1.0),
        threshold: float = 0.5,
        max_rotation: float = 90.0,
        max_scale_power: int = 6,
        min_scale_power: int = 0,
    ):
        self.texture_files: list[Path] = []
        if texture_dir is not None:
            folder = Path(texture_dir).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"texture_dir {folder} does not exist (set it to a DTD copy or to null)"
                )
            self.texture_files = list_images(folder, recursive=True)
            if not self.texture_files:
                log.warning("texture_dir %s holds no images; using procedural textures", folder)
        self.beta_range = beta_range
        self.threshold = threshold
        self.max_rotation = max_rotation
        self.max_scale_power = max_scale_power
        self.min_scale_power = min_scale_power
        self.texture_augmentation = _texture_augmentation()

    def _texture(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        if self.texture_files:
            source = read_image(self.texture_files[int(rng.integers(len(self.texture_files)))])
            texture = resize_image(source, height, width)  # antialiased, like every image we shrink
        else:
            texture = procedural_texture(height, width, rng)
        texture_u8 = np.round(np.clip(texture, 0.0, 1.0) * 255).astype(np.uint8)  # some ops are uint8-only
        _seed_transform(self.texture_augmentation, rng)
        return self.texture_augmentation(image=texture_u8)["image"].astype(np.float32) / 255.0

    def _noise_mask(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        noise = perlin_noise(height, width, _random_cells(height, width, rng, self.max_scale_power, self.min_scale_power), rng)
        noise = _rotate(noise, rng.uniform(-self.max_rotation, self.max_rotation))
        return noise > self.threshold

    def _draw(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        region = self._noise_mask(height, width, rng)
        if not region.any():
            return image.copy(), np.zeros((height, width), np.float32)
        texture = self._texture(height, width, rng)
        beta = rng.uniform(*self.beta_range)
        blended = (1.0 - beta) * texture + beta * image
        return _exact_mask(image, blended, region)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return _draw_until_visible(self._draw, np.asarray(image, np.float32), rng)


class EitherSynthesis:
    """One of several syntheses per image, chosen with the given probabilities (from the image's rng)."""

    def __init__(self, choices: list, probabilities: list[float]):
        if len(choices) != len(probabilities) or abs(sum(probabilities) - 1) > 1e-9:
            raise ValueError("EitherSynthesis needs one probability per choice, summing to 1")
        self.choices, self.probabilities = list(choices), list(probabilities)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.choices[int(rng.choice(len(self.choices), p=self.probabilities))](image, rng)


def onenip_synthesis(texture_dir: str | Path | None = None) -> EitherSynthesis:
    """OneNIP's hybrid anomalies (spec onenip.md §6), with probability 0.5 each:

    - CutPaste, normal or scar with equal odds, colour jitter 0.4 (hue 0.1);
    - DRAEM-style Perlin: lattices 2**{1..5}, rotation U(-5, 5) degrees, threshold 0.5, β ~ U(0, 0.8).
    """
    return EitherSynthesis(
        [CutPaste("3way", colour_jitter=0.4, hue_jitter=0.1),
         PerlinAnomaly(texture_dir=texture_dir, beta_range=(0.0, 0.8), max_rotation=5.0,
                       min_scale_power=1, max_scale_power=6)],
        [0.5, 0.5],
    )


def build_synthesis(
    name: str | None, texture_dir: str | Path | None = None
) -> CutPaste | PerlinAnomaly | EitherSynthesis | None:
    """The synthesis a config names: none, cutpaste, cutpaste_scar, cutpaste_3way, perlin or cutpaste_or_perlin."""
    key = "none" if name is None else str(name).strip().lower()
    if key == "none":
        return None
    if key == "cutpaste":
        return CutPaste("normal")
    if key == "cutpaste_scar":
        return CutPaste("scar")
    if key == "cutpaste_3way":
        return CutPaste("3way")
    if key == "perlin":
        return PerlinAnomaly(texture_dir=texture_dir)
    if key == "cutpaste_or_perlin":
        return onenip_synthesis(texture_dir)
    raise ValueError(f"unknown synthesis '{name}'; choose one of: {', '.join(SYNTHESIS_NAMES)}")
