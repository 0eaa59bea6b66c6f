"""Using a trained detector without a dataset: load it from a checkpoint, score a folder of new images.

``load_detector`` rebuilds the detector class named in the checkpoint from its saved
hyper-parameters, without looking up any pretrained weights (the checkpoint holds them all), and
loads every weight and fitted statistic. ``predict_folder`` streams a folder through the model's
``forward``: one CSV row and one map image per image as it goes, so memory does not grow with the
number of images.
"""

from __future__ import annotations

import csv
import importlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import read_image, resize_image
from datamodules.layouts import list_images
from datamodules.validate import DatasetError
from lightning_modules.base import AnomalyDetector
from lightning_modules.reporting import heatmap_rgb
from lightning_modules.resume import CheckpointError, read_checkpoint
from networks.anomaly_model import AnomalyModel
from networks.backbones import weights_restored_later

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("path", "score", "normalized_score", "predicted_label")


def load_detector(checkpoint_path: str | Path, map_location: str | torch.device = "cpu") -> AnomalyDetector:
    """The trained detector of a checkpoint (final.ckpt or last.ckpt), in eval mode, ready to score.

    ``detector.calibration_precision`` is the Lightning precision it was calibrated under (e.g. "bf16-mixed").
    """
    checkpoint = read_checkpoint(checkpoint_path)
    class_path = checkpoint.get("detector_class")
    if class_path is None:
        raise CheckpointError(f"{checkpoint_path} does not name its detector class (it was written by an older "
                              "version of this repository); evaluate it with evaluate.py and its run's config.yaml.")
    module_name, class_name = class_path.rsplit(".", 1)
    detector_class = getattr(importlib.import_module(module_name), class_name)
    with weights_restored_later():
        detector = detector_class.load_from_checkpoint(checkpoint_path, map_location=map_location)
    detector.calibration_precision = str(checkpoint.get("precision", "32-true"))
    return detector.eval().requires_grad_(False)


def autocast_for(precision: str, device: torch.device):
    """What Lightning's precision setting does around a forward pass: autocast for the mixed ones."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


def require_calibrated(model: AnomalyModel, use: str) -> None:
    """Prediction and export need a calibrated model."""
    if not model.is_calibrated():
        raise CheckpointError(f"This checkpoint's model has no fitted statistics or decision threshold (e.g. a "
                              f"last.ckpt saved before calibration); {use} with final.ckpt.")


def require_image_only_and_calibrated(model: AnomalyModel, use: str) -> None:
    """Prediction on a folder needs a calibrated model that scores images alone."""
    require_calibrated(model, use)
    if model.input_fields:
        raise ValueError(f"{type(model).__name__} needs {list(model.input_fields)} besides the image; "
                         f"`{use}` on images alone is not supported for it yet.")


class ImageFolder(Dataset):
    """Every image under a folder (recursively, any format ``read_image`` reads), resized for the model."""

    def __init__(self, folder: Path, image_size: int) -> None:
        self.folder, self.image_size = folder, image_size
        self.paths = list_images(folder, recursive=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            image = read_image(path)
        except DatasetError as error:
            return {"path": str(path), "error": str(error), "image": torch.zeros(3, self.image_size, self.image_size),
                    "height": 0, "width": 0}
        resized = resize_image(image, self.image_size, self.image_size)
        return {"path": str(path), "error": "", "image": torch.from_numpy(resized.transpose(2, 0, 1).copy()),
                "height": image.shape[0], "width": image.shape[1]}


@dataclass
class PredictionSummary:
    images: int
    anomalous: int
    skipped: list[str]
    csv_path: Path


@torch.inference_mode()
def predict_folder(detector: AnomalyDetector, folder: str | Path, output_dir: str | Path, batch_size: int = 8,
                   save_maps: bool = False, num_workers: int = 0, precision: str | None = None) -> PredictionSummary:
    """Score every image under ``folder``; write predictions.csv, maps/*.png and (``save_maps``) raw_maps/*.npy.

    ``precision`` (default: the one the checkpoint was calibrated under, so scores match its threshold and
    its test scores) is a Lightning precision string: "32-true", "bf16-mixed", ...

    The PNG is the map on the threshold scale (``AnomalyModel.normalized_map``: mid-colour = the pixel
    threshold) over the image, at the image's own size; the .npy is the raw map at the model's input size.
    """
    folder, output_dir = Path(folder), Path(output_dir)
    model = detector.model
    require_image_only_and_calibrated(model, "predict")
    dataset = ImageFolder(folder, model.image_size)
    if not len(dataset):
        raise FileNotFoundError(f"No images under {folder} (searched recursively for .png/.jpg/.jpeg/.bmp/.tif).")
    device = next(model.parameters()).device
    precision = precision or getattr(detector, "calibration_precision", "32-true")
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "predictions.csv"
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    summary = PredictionSummary(images=0, anomalous=0, skipped=[], csv_path=csv_path)
    with open(csv_path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(PREDICTION_COLUMNS)
        for batch in loader:
            readable = [i for i, error in enumerate(batch["error"]) if not error]
            for i, error in enumerate(batch["error"]):
                if error:
                    summary.skipped.append(error)
                    logger.warning("skipped: %s", error)
            if not readable:
                continue
            with autocast_for(precision, device):
                output = model(batch["image"][readable].to(device))
            scores = output.image_score.float()
            normalized, labels = model.normalized_score(scores), model.predicted_label(scores)
            maps = output.anomaly_map.float()[:, 0]
            shown = model.normalized_map(maps).cpu().numpy()
            for row, i in enumerate(readable):
                path = Path(batch["path"][i])
                writer.writerow([str(path), repr(float(scores[row])), repr(float(normalized[row])), int(labels[row])])
                relative = path.relative_to(folder).with_suffix("")
                _write_map_png(output_dir / "maps" / relative.with_suffix(".png"), path, shown[row],
                               int(batch["height"][i]), int(batch["width"][i]))
                if save_maps:
                    target = output_dir / "raw_maps" / relative.with_suffix(".npy")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    np.save(target, maps[row].cpu().numpy())
                summary.images += 1
                summary.anomalous += int(labels[row])
            stream.flush()
    return summary


def _write_map_png(target: Path, image_path: Path, normalized_map: np.ndarray, height: int, width: int) -> None:
    """The map (0.5 = threshold) as a heat map blended 50/50 over the image, at the image's size."""
    image = read_image(image_path)
    resized = cv2.resize(normalized_map, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = heatmap_rgb(resized, 0.0, 1.0).astype(np.float32) / 255.0
    blended = (0.5 * image + 0.5 * heat).clip(0, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), cv2.cvtColor((blended * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
