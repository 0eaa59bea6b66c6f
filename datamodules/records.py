"""One sample of a dataset, as the layout scanners list it (paths only, nothing is read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
ANOMALY_KINDS = ("good", "structural", "logical", "anomaly")


@dataclass(frozen=True)
class SampleRecord:
    """An image, its label and where its ground-truth mask files are.

    `mask_paths` is empty for normal images. LOCO lists one file per defect region; the pixel mask
    is their union. An anomalous image with no mask files only exists in the `folder` layout
    (label-only defects); pixel metrics skip it (`has_mask` is False).
    """

    image_path: Path
    label: int  # 0 normal, 1 anomalous
    category: str
    split: str  # "train" | "validation" | "test"
    defect_type: str  # "good" or the defect folder name
    anomaly_kind: str  # "good" | "structural" | "logical" | "anomaly"
    mask_paths: tuple[Path, ...] = ()

    @property
    def has_mask(self) -> bool:
        """True when the pixel ground truth is known: normal images (all zero) or masked anomalies."""
        return self.label == 0 or len(self.mask_paths) > 0
