"""Export a trained detector's whole inference path as one graph: ONNX or TorchScript.

    python export.py --checkpoint runs/<run>/checkpoints/final.ckpt --format onnx [--output model.onnx]
    python export.py --checkpoint runs/<run>/checkpoints/final.ckpt --format torchscript

The graph is the model's ``forward``: [0, 1] RGB images (N×3×S×S, any N) → input normalisation →
networks → map post-processing → (anomaly_map N×1×S×S, image_score N), with every fitted statistic
inside. A model that needs more than the image (``input_fields``, e.g. OneNIP's ``category_index`` under
``prompt_selection: label``) gets one more graph input per field, N values each, named as the field. Beside it, ``<output>.json`` (e.g. ``model.onnx.json``) says the input size and range, the normalisation done inside,
the decision threshold and how to read the outputs. ONNX needs the export extra:
``pip install -e ".[export]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.cli import run_command
from lightning_modules.prediction import load_detector, require_calibrated
from networks.anomaly_model import AnomalyModel

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
OUTPUT_NAMES = ("anomaly_map", "image_score")


class InferenceGraph(nn.Module):
    """The model's forward with plain tensor outputs (exporters take tuples, not named tuples)."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, *fields: Tensor) -> tuple[Tensor, Tensor]:
        anomaly_map, image_score = self.model(images, **dict(zip(self.model.input_fields, fields)))
        return anomaly_map, image_score


def export_model(model: AnomalyModel, output: str | Path, export_format: str, example_batch: int = 2,
                 calibration_precision: str = "32-true") -> Path:
    """Write ``model`` (calibrated; fp32 weights) as ONNX or TorchScript for the CPU, plus the JSON beside it."""
    if export_format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {export_format!r}")
    require_calibrated(model, "export")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # A copy on the CPU: the caller's model stays where it is, and float64 statistics (PUAD's Gaussian) stay float64.
    graph = InferenceGraph(copy.deepcopy(model).cpu()).eval()
    images = torch.rand(example_batch, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    fields = tuple(model.example_fields(example_batch)[name] for name in model.input_fields)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if export_format == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModuleNotFoundError(f"ONNX export needs {', '.join(missing)}: pip install -e \".[export]\"")
    with torch.no_grad():
        if export_format == "onnx":
            torch.onnx.export(
                graph, (images, *fields), str(output), input_names=["images", *model.input_fields],
                output_names=list(OUTPUT_NAMES), dynamo=True, external_data=False,
                # *fields is one argument (a tuple) to torch.export; with none, images alone
                dynamic_shapes=({0: batch}, tuple({0: batch} for _ in fields)) if fields else ({0: batch},),
            )
        else:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what many runtimes load
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
                traced = torch.jit.trace(graph, (images, *fields), check_trace=False)
            # A second batch size must give the same as eager: the batch dimension was not baked in.
            check = (torch.rand(example_batch + 1, 3, model.image_size, model.image_size),
                     *(model.example_fields(example_batch + 1)[name] for name in model.input_fields))
            torch.testing.assert_close(traced(*check), graph(*check), rtol=1e-4, atol=1e-5)
            traced.save(str(output))
    description = inference_description(model, export_format, calibration_precision)
    description_path(output).write_text(json.dumps(description, indent=2) + "\n")
    return output


def description_path(output: Path) -> Path:
    """model.onnx → model.onnx.json (an ONNX and a TorchScript export can share a folder)."""
    return output.with_name(output.name + ".json")


def inference_description(model: AnomalyModel, export_format: str, calibration_precision: str) -> dict[str, Any]:
    return {
        "computes_in": "float32",
        "calibrated_under_precision": calibration_precision,
        "format": export_format, "model": type(model).__name__, "input": model.describe_input(),
        "outputs": {"anomaly_map": "N×1×S×S float32, larger = more anomalous",
                    "image_score": "N float32, larger = more anomalous"},
        "decision_threshold": {
            "image_threshold": float(model.image_threshold), "pixel_threshold": float(model.pixel_threshold),
            "rule": "anomalous when image_score > image_threshold; anomalous pixel when anomaly_map > pixel_threshold",
            "fitted_on": "held-out normal validation images"},
        "normalized_score": {"normal_image_score": float(model.normal_image_score),
                             "formula": "clip(0.5 + 0.5 * (score - threshold) / (threshold - normal_image_score), 0, 1)"},
        "fitted_with": model.fitted_with,
    }


def main(args: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--output", type=Path, default=None, help="default: <run>/export/model.onnx (or .pt)")
    known = parser.parse_args(args)
    if not known.checkpoint.is_file():
        raise SystemExit(f"export.py: checkpoint {known.checkpoint} does not exist")
    detector = load_detector(known.checkpoint)
    run_dir = known.checkpoint.resolve().parent.parent
    output = known.output or run_dir / "export" / f"model{FORMATS[known.format]}"
    written = export_model(detector.model, output, known.format,
                           calibration_precision=detector.calibration_precision)
    print(f"wrote {written} and {description_path(written)}")
    return written


if __name__ == "__main__":
    run_command(main)
