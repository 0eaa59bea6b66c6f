"""The embedded dataset: a small, procedurally generated dataset in the MVTec LOCO layout.

Why: the quickstart must run offline, in minutes, on a laptop, without downloading a benchmark. This
module draws two categories with numpy + OpenCV, deterministically from a seed, and writes them as
an MVTec LOCO tree, so the ordinary LOCO scanner, metrics (including sPRO) and logging all run on it.

Categories
- ``woven_tiles`` (texture): a basket weave whose phase, colours, strand brightness, illumination
  and noise vary per image. Test anomalies are structural only: ``scratch`` (thin bright line),
  ``hole`` (dark round blob), ``stain`` (soft coloured blob). It has no ``logical_anomalies``.
- ``parts_tray`` (object arrangement): a tray holding two red circles, a blue square and a yellow
  bar at fixed slots with small position/rotation jitter. Logical anomalies: ``missing_part``,
  ``extra_part``, ``swapped_parts``, ``recoloured_part``; structural: ``scratch``, ``dent``.

Masks follow LOCO: ``ground_truth/<kind>_anomalies/<image stem>/<region>.png``, one file per defect
region, grey value = the defect's ``pixel_value``, and every mask contains every pixel the defect
changed (the tests render each image with and without its defect to check this).

Saturation values (``defects_config.json``, used by sPRO):
- every defect whose mask is the changed region itself (structural defects, an extra part, a
  recoloured part, each location of a swap) saturates when the whole region is found:
  ``relative_saturation: true``, ``saturation_threshold: 1.0``;
- ``missing_part`` follows LOCO's "missing object" rule: its mask is the part's footprint grown by
  the part's position jitter (where the part could have been), and it saturates once an area equal
  to one part is found: ``relative_saturation: false``, ``saturation_threshold`` = the mean
  rasterised area of a part at the generated image size (all parts are drawn with ~equal area, so
  one threshold fits all of them).

Caching: ``ensure_embedded_dataset`` regenerates only when ``<root>/.generated.json`` (generator
version, seed, image size, counts, categories) differs from what is asked. A tree is built in a
sibling temp folder and renamed into place, so an interrupted run never leaves a tree that looks
complete; a lock file ``.<root name>.lock`` next to the root serialises concurrent processes; a
non-empty folder without the marker is never overwritten.

Every image gets its own random stream (``sample_key``), split into independent scene, defect and
noise streams, so rendering an anomalous image without its defect reproduces its normal twin
pixel for pixel; that is what the mask tests rely on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER_NAME = ".generated.json"
EMBEDDED_CATEGORIES: tuple[str, ...] = ("woven_tiles", "parts_tray")
DEFAULT_IMAGE_SIZE = 128
MIN_IMAGE_SIZE = 32
# All geometry below is written for a 128 px image and scaled by image_size / 128.
_DESIGN_SIZE = 128.0

STRUCTURAL = "structural"
LOGICAL = "logical"


@dataclass(frozen=True)
class DefectType:
    """One defect type of a category, as it appears in ``defects_config.json``."""

    name: str
    kind: str  # "structural" | "logical"
    pixel_value: int
    relative_saturation: bool = True


@dataclass(frozen=True)
class SplitCounts:
    """Images per split; the anomalous counts are split evenly over the category's defect types."""

    train: int = 60
    validation: int = 12
    test_good: int = 20
    test_structural: int = 20
    test_logical: int = 20


@dataclass
class RenderedSample:
    """An RGB uint8 image and its defect regions (one boolean H×W array per mask file)."""

    image: np.ndarray
    regions: list[np.ndarray] = field(default_factory=list)
    defect: DefectType | None = None


_DEFECT_TYPES: dict[str, tuple[DefectType, ...]] = {
    "woven_tiles": (
        DefectType("scratch", STRUCTURAL, 255),
        DefectType("hole", STRUCTURAL, 254),
        DefectType("stain", STRUCTURAL, 253),
    ),
    "parts_tray": (
        DefectType("missing_part", LOGICAL, 255, relative_saturation=False),
        DefectType("extra_part", LOGICAL, 254),
        DefectType("swapped_parts", LOGICAL, 253),
        DefectType("recoloured_part", LOGICAL, 252),
        DefectType("scratch", STRUCTURAL, 251),
        DefectType("dent", STRUCTURAL, 250),
    ),
}


def defect_types(category: str, kind: str | None = None) -> tuple[DefectType, ...]:
    """The defect types of ``category``, optionally only those of one kind."""
    if category not in _DEFECT_TYPES:
        raise ValueError(f"unknown embedded category {category!r}; known: {EMBEDDED_CATEGORIES}")
    return tuple(d for d in _DEFECT_TYPES[category] if kind is None or d.kind == kind)


def _find_defect(category: str, name: str) -> DefectType:
    for defect in defect_types(category):
        if defect.name == name:
            return defect
    names = [d.name for d in defect_types(category)]
    raise ValueError(f"category {category!r} has no defect {name!r}; it has {names}")


# ---------------------------------------------------------------------------------------------
# Random streams


def sample_key(seed: int, category: str, split_folder: str, index: int) -> tuple[int, ...]:
    """Entropy of one image: stable across runs and Python versions (crc32, not ``hash``)."""
    return (
        int(seed),
        zlib.crc32(category.encode()),
        zlib.crc32(split_folder.encode()),
        int(index),
    )


def _streams(key: Sequence[int]) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent scene, defect and noise generators, so a defect never shifts the scene draws."""
    scene, defect, noise = np.random.SeedSequence(list(key)).spawn(3)
    return np.random.default_rng(scene), np.random.default_rng(defect), np.random.default_rng(noise)


def _finish(image: np.ndarray, noise_rng: np.random.Generator, sigma: float) -> np.ndarray:
    noisy = image + noise_rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


_SUBPIXEL_BITS = 4  # OpenCV "shift": coordinates carry 4 fractional bits


def _fixed_point(values) -> np.ndarray:
    """Coordinates in OpenCV's fixed-point form for drawing with ``shift=_SUBPIXEL_BITS``."""
    return np.rint(np.asarray(values, dtype=np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _draw_ellipse(mask: np.ndarray, centre, axes, angle: float) -> None:
    """Fill an ellipse (value 1) at sub-pixel precision."""
    centre_fixed = tuple(int(v) for v in _fixed_point(centre))
    axes_fixed = tuple(int(max(v, 1 << _SUBPIXEL_BITS)) for v in _fixed_point(axes))
    cv2.ellipse(mask, centre_fixed, axes_fixed, float(angle), 0, 360, 1, -1, cv2.LINE_8, _SUBPIXEL_BITS)


def _draw_polyline(mask: np.ndarray, points, thickness: int) -> None:
    """Draw an open polyline (value 1) at sub-pixel precision."""
    cv2.polylines(mask, [_fixed_point(points)], False, 1, thickness, cv2.LINE_8, _SUBPIXEL_BITS)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


# ---------------------------------------------------------------------------------------------
# woven_tiles


def _weave(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A basket weave: checkerboard cells of two strands, alternating horizontal and vertical."""
    cell = 16.0 * scale
    strands_per_cell = 2
    dx, dy = rng.uniform(0.0, 2 * cell, size=2)  # phase jitter over the full 2-cell period
    warp = np.array([196.0, 164.0, 118.0]) + rng.uniform(-8, 8, size=3)
    weft = np.array([168.0, 138.0, 100.0]) + rng.uniform(-8, 8, size=3)
    cells_across = math.ceil(size / cell) + 3
    strand_gain = rng.uniform(0.92, 1.08, size=(cells_across, cells_across, strands_per_cell))

    coords = np.arange(size, dtype=np.float64)
    x = coords[None, :] + dx
    y = coords[:, None] + dy
    x, y = np.broadcast_arrays(x, y)
    col, row = np.floor(x / cell).astype(int), np.floor(y / cell).astype(int)
    horizontal = (col + row) % 2 == 0
    along = np.where(horizontal, x % cell, y % cell) / cell  # position along the strand in its cell
    across = np.where(horizontal, y % cell, x % cell) / cell * strands_per_cell
    strand = np.floor(across).astype(int)
    within = across - strand  # 0..1 across one strand; the dark gap sits at 0 and 1
    profile = np.sin(np.pi * within) ** 0.6
    over_under = 0.82 + 0.18 * np.sin(np.pi * along)  # strands dip where they pass under
    gain = strand_gain[col - col.min(), row - row.min(), strand]
    intensity = (0.32 + 0.68 * profile * over_under) * gain
    colour = np.where(horizontal[..., None], warp, weft)
    image = intensity[..., None] * colour

    # Soft illumination: a global brightness and a gentle linear gradient.
    brightness = rng.uniform(0.94, 1.06)
    gx, gy = rng.uniform(-0.04, 0.04, size=2)
    ramp = 1.0 + gx * (coords[None, :] / size - 0.5) + gy * (coords[:, None] / size - 0.5)
    return image * (brightness * ramp)[..., None]


def _texture_scratch(image: np.ndarray, scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    size = image.shape[0]
    margin = 10 * scale
    start = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(30, 70) * scale
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-6, 6) * scale
    points = np.stack([start, start + direction * length / 2 + normal * bend, start + direction * length])
    mask = np.zeros((size, size), np.uint8)
    thickness = max(1, round(2 * scale))
    _draw_polyline(mask, points, thickness)
    region = mask.astype(bool)
    image[region] = np.array([236.0, 232.0, 222.0]) * rng.uniform(0.95, 1.03)
    return [region]


def _texture_hole(image: np.ndarray, scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    size = image.shape[0]
    margin = 12 * scale
    centre = rng.uniform(margin, size - margin, size=2)
    axes = rng.uniform(4, 8, size=2) * scale
    mask = np.zeros((size, size), np.uint8)
    _draw_ellipse(mask, centre, axes, float(rng.uniform(0, 180)))
    region = mask.astype(bool)
    yy, xx = np.nonzero(region)
    radial = np.hypot(xx - centre[0], yy - centre[1]) / max(axes.max(), 1.0)
    image[yy, xx] = (14.0 + 30.0 * np.clip(radial, 0, 1))[:, None] * np.array([1.0, 0.95, 0.9])
    return [region]


_STAIN_TINTS = np.array([[92.0, 112.0, 58.0], [84.0, 58.0, 40.0], [70.0, 96.0, 128.0]])


def _texture_stain(image: np.ndarray, scale: float, rng: np.random.Generator) -> list[np.ndarray]:
    size = image.shape[0]
    margin = 16 * scale
    centre = rng.uniform(margin, size - margin, size=2)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(3):  # a union of overlapping ellipses gives an irregular outline
        offset = rng.uniform(-5, 5, size=2) * scale
        axes = rng.uniform(5, 11, size=2) * scale
        _draw_ellipse(mask, centre + offset, axes, float(rng.uniform(0, 180)))
    region = mask.astype(bool)
    # Soft edge: opacity rises from 0.35 at the border to 0.75 inside, and is 0 outside the mask.
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    alpha = np.where(region, 0.35 + 0.40 * np.clip(depth / (4 * scale), 0, 1), 0.0)[..., None]
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))] * rng.uniform(0.9, 1.1)
    image[:] = (1 - alpha) * image + alpha * tint
    return [region]


_TEXTURE_DEFECTS = {"scratch": _texture_scratch, "hole": _texture_hole, "stain": _texture_stain}


def _render_woven_tiles(key: Sequence[int], defect: DefectType | None, size: int) -> RenderedSample:
    scale = size / _DESIGN_SIZE
    scene_rng, defect_rng, noise_rng = _streams(key)
    image = _weave(size, scale, scene_rng)
    regions = _TEXTURE_DEFECTS[defect.name](image, scale, defect_rng) if defect else []
    return RenderedSample(_finish(image, noise_rng, sigma=3.0), regions, defect)


# ---------------------------------------------------------------------------------------------
# parts_tray


@dataclass
class _Part:
    shape: str  # "circle" | "square" | "bar"
    centre: np.ndarray  # (x, y) in pixels
    angle: float  # degrees
    colour: np.ndarray  # RGB float


# Slots of the normal arrangement (design pixels) and the normal colours.
_SLOTS = (("circle", (38, 38)), ("circle", (90, 38)), ("square", (38, 90)), ("bar", (90, 90)))
_PART_COLOURS = {
    "circle": np.array([200.0, 52.0, 46.0]),
    "square": np.array([52.0, 92.0, 190.0]),
    "bar": np.array([226.0, 190.0, 42.0]),
}
_FOREIGN_COLOURS = np.array([[60.0, 170.0, 82.0], [140.0, 70.0, 172.0], [40.0, 180.0, 190.0]])
_PART_JITTER = 3.0  # design pixels, per axis
_TRAY_JITTER = 2.0
# Sizes chosen so the three shapes have about the same area (~320 design px²).
_CIRCLE_RADIUS = 10.0
_SQUARE_SIDE = 18.0
_BAR_SIZE = (36.0, 9.0)


def _footprint(part: _Part, size: int, scale: float) -> np.ndarray:
    """The part's pixels, drawn with sub-pixel precision so small rotations keep straight edges."""
    mask = np.zeros((size, size), np.uint8)
    if part.shape == "circle":
        centre = tuple(int(v) for v in _fixed_point(part.centre))
        cv2.circle(mask, centre, int(_fixed_point(_CIRCLE_RADIUS * scale)), 1, -1, cv2.LINE_8, _SUBPIXEL_BITS)
    else:
        width, height = (_SQUARE_SIDE, _SQUARE_SIDE) if part.shape == "square" else _BAR_SIZE
        box = cv2.boxPoints(
            ((float(part.centre[0]), float(part.centre[1])), (width * scale, height * scale), part.angle)
        )
        cv2.fillPoly(mask, [_fixed_point(box)], 1, cv2.LINE_8, _SUBPIXEL_BITS)
    return mask.astype(bool)


def _paint_part(image: np.ndarray, part: _Part, footprint: np.ndarray, scale: float) -> None:
    """Fill the footprint with the part colour, lit from above (brighter top, darker bottom)."""
    yy, xx = np.nonzero(footprint)
    shade = 1.06 - 0.012 * (yy - part.centre[1]) / scale
    image[yy, xx] = np.clip(shade, 0.85, 1.15)[:, None] * part.colour


def _tray_scene(
    size: int, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[_Part]]:
    """The empty tray image, the tray's inner area, and the normal parts (not yet painted)."""
    table = np.array([60.0, 62.0, 66.0]) + rng.uniform(-5, 5, size=3)
    tray = np.array([208.0, 210.0, 212.0]) + rng.uniform(-6, 6, size=3)
    rim = tray * 0.8
    image = np.zeros((size, size, 3)) + table
    shift = rng.uniform(-_TRAY_JITTER, _TRAY_JITTER, size=2) * scale
    corner_lo = np.rint(np.array([6.0, 6.0]) * scale + shift).astype(int)
    corner_hi = np.rint(np.array([122.0, 122.0]) * scale + shift).astype(int)
    rim_width = max(1, round(3 * scale))
    outer = np.zeros((size, size), np.uint8)
    cv2.rectangle(outer, tuple(int(v) for v in corner_lo), tuple(int(v) for v in corner_hi), 1, -1)
    inner = cv2.erode(outer, _disk(rim_width)).astype(bool)
    image[outer.astype(bool)] = rim
    image[inner] = tray
    # A faint vertical light gradient over the tray floor.
    yy = np.arange(size, dtype=np.float64)[:, None, None] / size
    image = np.where(inner[..., None], image * (1.03 - 0.06 * yy), image)

    parts = []
    for shape, slot in _SLOTS:
        centre = np.array(slot, dtype=np.float64) * scale + shift
        centre += rng.uniform(-_PART_JITTER, _PART_JITTER, size=2) * scale
        angle = 0.0 if shape == "circle" else float(rng.uniform(-6, 6))
        colour = _PART_COLOURS[shape] + rng.uniform(-10, 10, size=3)
        parts.append(_Part(shape, centre, angle, colour))
    return image, inner, parts


def _place_extra_part(
    parts: list[_Part], inner: np.ndarray, size: int, scale: float, rng: np.random.Generator
) -> _Part:
    """A new part on free tray floor: it must not touch any part nor the rim (rejection sampling)."""
    shape = ("circle", "square", "bar")[rng.integers(3)]
    occupied = np.zeros((size, size), bool)
    for part in parts:
        occupied |= _footprint(part, size, scale)
    clearance = max(1, round(4 * scale))
    blocked = cv2.dilate(occupied.astype(np.uint8), _disk(clearance)).astype(bool) | ~cv2.erode(
        inner.astype(np.uint8), _disk(clearance)
    ).astype(bool)
    angle = 0.0 if shape == "circle" else float(rng.uniform(-6, 6))
    colour = _PART_COLOURS[shape] + rng.uniform(-10, 10, size=3)
    for _ in range(500):
        candidate = _Part(shape, rng.uniform(0, size, size=2), angle, colour)
        footprint = _footprint(candidate, size, scale)
        if footprint.any() and not (footprint & blocked).any():
            return candidate
    # The layout always leaves the tray centre free; reaching this means the layout was edited.
    raise RuntimeError("parts_tray: found no free place for an extra part")


def _render_parts_tray(key: Sequence[int], defect: DefectType | None, size: int) -> RenderedSample:
    scale = size / _DESIGN_SIZE
    scene_rng, rng, noise_rng = _streams(key)
    image, inner, parts = _tray_scene(size, scale, scene_rng)
    regions: list[np.ndarray] = []
    name = defect.name if defect else None

    if name == "missing_part":
        gone = parts.pop(int(rng.integers(len(parts))))
        # Where the part could have been: its footprint grown by the position jitter.
        grow = max(1, math.ceil(_PART_JITTER * scale))
        regions.append(cv2.dilate(_footprint(gone, size, scale).astype(np.uint8), _disk(grow)).astype(bool))
    elif name == "extra_part":
        extra = _place_extra_part(parts, inner, size, scale, rng)
        parts.append(extra)
        regions.append(_footprint(extra, size, scale))
    elif name == "swapped_parts":
        pairs = [
            (i, j)
            for i in range(len(parts))
            for j in range(i + 1, len(parts))
            if parts[i].shape != parts[j].shape
        ]
        i, j = pairs[int(rng.integers(len(pairs)))]
        before = [_footprint(parts[i], size, scale), _footprint(parts[j], size, scale)]
        parts[i].centre, parts[j].centre = parts[j].centre.copy(), parts[i].centre.copy()
        # Each location's region: what should be there united with what is there now.
        regions.append(before[0] | _footprint(parts[j], size, scale))
        regions.append(before[1] | _footprint(parts[i], size, scale))
    elif name == "recoloured_part":
        target = parts[int(rng.integers(len(parts)))]
        target.colour = _FOREIGN_COLOURS[rng.integers(len(_FOREIGN_COLOURS))] + rng.uniform(-8, 8, size=3)
        regions.append(_footprint(target, size, scale))

    footprints = [_footprint(part, size, scale) for part in parts]
    for part, footprint in zip(parts, footprints):
        _paint_part(image, part, footprint, scale)

    if name in ("scratch", "dent"):
        index = int(rng.integers(len(parts)))
        target, footprint = parts[index], footprints[index]
        mark = np.zeros((size, size), np.uint8)
        if name == "scratch":
            through = target.centre + rng.uniform(-3, 3, size=2) * scale
            angle = rng.uniform(0, np.pi)
            half = np.array([np.cos(angle), np.sin(angle)]) * 20 * scale
            _draw_polyline(mark, np.stack([through - half, through + half]), max(1, round(2 * scale)))
            region = mark.astype(bool) & footprint
            image[region] = np.array([244.0, 242.0, 236.0])
        else:
            centre = target.centre + rng.uniform(-3, 3, size=2) * scale
            axes = rng.uniform(3, 5, size=2) * scale
            _draw_ellipse(mark, centre, axes, float(rng.uniform(0, 180)))
            region = mark.astype(bool) & footprint
            yy, xx = np.nonzero(region)
            # A dent is a dimple: dark on the upper-left slope, lighter toward the lower right.
            slope = ((xx - centre[0]) + (yy - centre[1])) / (2 * max(axes.max(), 1.0))
            image[yy, xx] = target.colour * np.clip(0.5 + 0.25 * slope, 0.3, 0.75)[:, None]
        regions.append(region)

    return RenderedSample(_finish(image, noise_rng, sigma=2.5), regions, defect)


_RENDERERS = {"woven_tiles": _render_woven_tiles, "parts_tray": _render_parts_tray}


def render_sample(
    category: str, key: Sequence[int], defect_name: str | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> RenderedSample:
    """Render one image of ``category`` from its ``sample_key``; ``defect_name=None`` is the normal twin."""
    defect = _find_defect(category, defect_name) if defect_name is not None else None
    if category not in _RENDERERS:
        raise ValueError(f"unknown embedded category {category!r}; known: {EMBEDDED_CATEGORIES}")
    return _RENDERERS[category](key, defect, int(image_size))


# ---------------------------------------------------------------------------------------------
# defects_config.json


def part_area(image_size: int = DEFAULT_IMAGE_SIZE) -> float:
    """Mean rasterised area (pixels) of one tray part at ``image_size``: the missing-part saturation."""
    scale = image_size / _DESIGN_SIZE
    centre = np.array([image_size / 2, image_size / 2])
    areas = [
        _footprint(_Part(shape, centre, 0.0, _PART_COLOURS[shape]), image_size, scale).sum()
        for shape in ("circle", "square", "bar")
    ]
    return float(np.mean(areas))


def defects_config(category: str, image_size: int = DEFAULT_IMAGE_SIZE) -> list[dict]:
    """The ``defects_config.json`` records of ``category`` (LOCO format)."""
    records = []
    for defect in defect_types(category):
        threshold = 1.0 if defect.relative_saturation else round(part_area(image_size))
        records.append(
            {
                "defect_name": defect.name,
                "pixel_value": defect.pixel_value,
                "saturation_threshold": threshold,
                "relative_saturation": defect.relative_saturation,
            }
        )
    return records


# ---------------------------------------------------------------------------------------------
# Writing the tree


def _write_rgb(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _write_gray(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def _split_plan(category: str, counts: SplitCounts) -> Iterator[tuple[str, int, DefectType | None]]:
    """(folder under the category, index, defect) for every image; defect types take turns."""
    for folder, count in (
        ("train/good", counts.train),
        ("validation/good", counts.validation),
        ("test/good", counts.test_good),
    ):
        for index in range(count):
            yield folder, index, None
    for kind, count in ((STRUCTURAL, counts.test_structural), (LOGICAL, counts.test_logical)):
        kinds = defect_types(category, kind)
        if not kinds:
            continue
        for index in range(count):
            yield f"test/{kind}_anomalies", index, kinds[index % len(kinds)]


def _write_category(
    category_dir: Path, category: str, seed: int, image_size: int, counts: SplitCounts
) -> None:
    for folder, index, defect in _split_plan(category, counts):
        key = sample_key(seed, category, folder, index)
        sample = render_sample(category, key, defect.name if defect else None, image_size)
        image_dir = category_dir / folder
        image_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{index:03d}"
        _write_rgb(image_dir / f"{stem}.png", sample.image)
        if defect is None:
            continue
        mask_dir = category_dir / "ground_truth" / folder.split("/")[1] / stem
        mask_dir.mkdir(parents=True, exist_ok=True)
        for region_index, region in enumerate(sample.regions):
            mask = np.where(region, defect.pixel_value, 0).astype(np.uint8)
            _write_gray(mask_dir / f"{region_index:03d}.png", mask)
    (category_dir / "defects_config.json").write_text(
        json.dumps(defects_config(category, image_size), indent=4)
    )


def _marker(seed: int, image_size: int, counts: SplitCounts) -> dict:
    return {
        "generator": "datamodules.embedded",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "counts": asdict(counts),
        "categories": list(EMBEDDED_CATEGORIES),
    }


def read_marker(root: str | Path) -> dict | None:
    """The marker of a generated tree, or None when absent or unreadable."""
    try:
        return json.loads((Path(root) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Serialise generators of one root across processes (e.g. DDP ranks); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename below still prevents half trees
        yield
        return
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _refuse_foreign_folder(root: Path) -> None:
    """Never replace a folder this module did not write (no marker, not empty): it may be user data."""
    if root.exists() and read_marker(root) is None and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists, is not empty and has no {MARKER_NAME}: it is not a generated embedded dataset; "
            "refusing to overwrite it (choose another root or remove it)"
        )


def _install(staged: Path, root: Path) -> None:
    """Move a finished tree to ``root``, replacing an older generated tree there."""
    if root.exists():
        _refuse_foreign_folder(root)  # checked again: the folder may have appeared while we generated
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
        os.replace(root, stale / "tree")
        os.replace(staged, root)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staged, root)


def generate_embedded_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    counts: SplitCounts | Mapping[str, int] = SplitCounts(),
) -> Path:
    """(Re)write the whole tree under ``root``: built in a sibling temp folder, then renamed in place.

    The marker is written last inside the temp folder, so a tree at ``root`` always is complete.
    ``counts`` may be a mapping with ``SplitCounts`` field names (as it comes from a YAML config).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at least {MIN_IMAGE_SIZE} px (parts and defects vanish below), got {image_size}"
        )
    counts = counts if isinstance(counts, SplitCounts) else SplitCounts(**counts)
    root = Path(root).absolute()
    _refuse_foreign_folder(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    staged.chmod(0o755)  # mkdtemp makes it private; the dataset is ordinary readable data
    try:
        for category in EMBEDDED_CATEGORIES:
            _write_category(staged / category, category, seed, image_size, counts)
        (staged / MARKER_NAME).write_text(json.dumps(_marker(seed, image_size, counts), indent=2))
        _install(staged, root)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    log.info("generated the embedded dataset at %s (seed %d, %d px)", root, seed, image_size)
    return root


def ensure_embedded_dataset(root: str | Path, seed: int = 0, *, image_size: int = DEFAULT_IMAGE_SIZE) -> Path:
    """Return ``root`` holding the embedded dataset for ``seed``; generate it only when missing or stale."""
    root = Path(root).absolute()
    wanted = _marker(seed, image_size, SplitCounts())
    if read_marker(root) == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _generation_lock(root):
        if read_marker(root) != wanted:  # another process may have finished while we waited
            generate_embedded_dataset(root, seed=seed, image_size=image_size)
    return root
