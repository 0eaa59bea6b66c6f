"""The detector contract (networks/anomaly_model.py): each detector's model scores images alone, its
fitted statistics and threshold travel in its state dict, settings they were fitted under are checked
on loading, and the whole inference path exports to ONNX and TorchScript with the same results."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from export import description_path, export_model
from lightning_modules.registry import registered
from networks.anomaly_model import AnomalyOutput, FittedSettingsMismatch
from networks.ulsad import ULSADModel
from tests.runs import REPO

SIZE = 128


def random_batches(count: int, batch_size: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(batch_size, 3, SIZE, SIZE, generator=generator),
             "label": torch.zeros(batch_size, dtype=torch.long),
             "index": torch.arange(i * batch_size, (i + 1) * batch_size),
             "category": ["first", "second"] * (batch_size // 2) + ["first"] * (batch_size % 2)}
            for i in range(count)]


def _factory(entry, settings):
    return lambda: entry.load()(image_size=SIZE, **settings)


# Every registered detector (and its variants: lightning_modules/registry.py), built with its tiny test settings.
DETECTORS = {name: _factory(entry, settings) for entry in registered()
             for name, settings in entry.contract_cases().items()}


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def calibrated(request):
    """A weights-free detector calibrated through its public hooks on random images, with no Trainer."""
    torch.manual_seed(0)
    detector = DETECTORS[request.param]()
    train, validation = random_batches(3, 4, seed=1), random_batches(3, 4, seed=2)
    if detector.fit_only:
        detector.fit_pass(train)
    else:
        detector.fit_training_statistics(train)
    assert not detector.is_calibrated()
    detector.calibrate(validation, train)
    assert detector.is_calibrated()
    return detector.eval()


def test_the_model_scores_images_alone(calibrated):
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = calibrated.model(images, **calibrated.model.example_fields(3))
    assert isinstance(output, AnomalyOutput)
    assert output.anomaly_map.shape == (3, 1, SIZE, SIZE) and output.image_score.shape == (3,)
    assert output.anomaly_map.dtype == output.image_score.dtype == torch.float32
    assert bool(torch.isfinite(output.anomaly_map).all()) and bool(torch.isfinite(output.image_score).all())


def test_the_threshold_comes_from_the_validation_scores_at_the_target_rate(calibrated):
    model = calibrated.model
    with torch.no_grad():
        scores = torch.cat([model(batch["image"], **calibrated.model_inputs(batch)).image_score
                            for batch in random_batches(3, 4, seed=2)])
    expected = np.quantile(scores.double().numpy(), 1 - calibrated.threshold_fpr)
    assert float(model.image_threshold) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(model.normal_image_score) == pytest.approx(np.median(scores.double().numpy()), rel=1e-5, abs=1e-6)
    # 12 validation images at a 5% rate: the threshold lies between the 2nd-highest and the highest score
    assert int((scores > model.image_threshold).sum()) == 1
    assert model.predicted_label(scores).tolist() == (scores > model.image_threshold).long().tolist()
    at_threshold = model.normalized_score(model.image_threshold.view(1))
    assert float(at_threshold) == pytest.approx(0.5)
    assert float(model.normalized_score(model.normal_image_score.view(1))) == pytest.approx(0.0, abs=1e-6)


def test_everything_fitted_travels_in_the_state_dict(calibrated):
    fresh = type(calibrated)(**calibrated.hparams)
    assert not fresh.is_calibrated()
    fresh.load_state_dict(calibrated.state_dict())
    assert fresh.is_calibrated()
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    fields = calibrated.model.example_fields(2)
    with torch.no_grad():
        expected, actual = calibrated.model(images, **fields), fresh.eval().model(images, **fields)
    assert torch.equal(expected.anomaly_map, actual.anomaly_map) and torch.equal(expected.image_score, actual.image_score)


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_export_gives_the_same_maps_and_scores_as_pytorch(calibrated, export_format, tmp_path):
    model = calibrated.model
    path = export_model(model, tmp_path / f"model.{export_format}", export_format)
    description = json.loads(description_path(path).read_text())
    assert description["decision_threshold"]["image_threshold"] == pytest.approx(float(model.image_threshold))
    assert description["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    images = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))  # not the example batch size
    fields = {name: value.flip(0) for name, value in model.example_fields(5).items()}  # not the traced values
    assert list(fields) == list(model.input_fields) and description["input"]["fields"] == list(model.input_fields)
    with torch.no_grad():
        expected_map, expected_score = (value.numpy() for value in model(images, **fields))
    if export_format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy(), **{name: value.numpy() for name, value in fields.items()}}
        anomaly_map, image_score = session.run(None, feed)
    else:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            anomaly_map, image_score = (value.numpy() for value in loaded(images, *fields.values()))
    assert anomaly_map.shape == expected_map.shape and image_score.shape == expected_score.shape
    map_range = float(expected_map.max() - expected_map.min())
    assert np.abs(anomaly_map - expected_map).max() <= 1e-4 * map_range
    np.testing.assert_allclose(image_score, expected_score, rtol=1e-5, atol=1e-5 * np.abs(expected_score).max())


def test_loading_fitted_statistics_under_another_setting_is_refused():
    torch.manual_seed(0)
    model = ULSADModel("resnet18", pretrained=False, image_size=SIZE, frn_hidden_scale=0.125, alpha_local=0.5)
    model.record_fitted_settings()
    state = model.state_dict()
    same = ULSADModel("resnet18", pretrained=False, image_size=SIZE, frn_hidden_scale=0.125, alpha_local=0.5)
    same.load_state_dict(state)
    assert same.fitted_with["alpha_local"] == 0.5
    other = ULSADModel("resnet18", pretrained=False, image_size=SIZE, frn_hidden_scale=0.125, alpha_local=0.0)
    with pytest.raises(FittedSettingsMismatch, match=r"alpha_local=0.5 in the checkpoint but 0.0 now"):
        other.load_state_dict(state)


@pytest.mark.parametrize("detector", [entry.load() for entry in registered()], ids=lambda cls: cls.__name__)
def test_detectors_have_short_names_and_every_argument_has_a_help_line(detector, capsys):
    """`--model.help ULSAD` (a short name) documents every init argument from the class docstring's Args (the CLI
    in this process: what `python train.py --model.help ULSAD` prints; test_help_lists_every_detector runs that)."""
    import inspect
    import re

    from lightning_modules.cli import AnomalyCLI

    with pytest.raises(SystemExit):
        AnomalyCLI(args=["--model.help", detector.__name__])
    text = capsys.readouterr().out
    for name in inspect.signature(detector).parameters:
        block = re.search(rf"\n  --model\.{name} (.*?)(?=\n  --|\Z)", text, flags=re.DOTALL)
        assert block, f"{name} is not listed in --model.help {detector.__name__}"
        described = block.group(1).split("(type:")[0]
        words = re.sub(r"--model\.\S+|\b[A-Z_]{2,}\b|\{true,false\}|\[ITEM,\.\.\.\]|,", " ", described).split()
        assert len(words) >= 2, f"{detector.__name__}.{name} has no help line: {block.group(0)!r}"


def test_help_lists_every_detector():
    text = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True).stdout
    for entry in registered():
        assert entry.name in text, entry.name


def test_a_statistic_only_detector_needs_no_optimiser_and_runs_one_pass(embedded_root, tmp_path):
    """tests/toy_detector.py: a memory-bank detector written against the contract (one model file, one module,
    nothing shared touched) fits in one pass over the training images, with no optimiser and no epoch, and beats
    chance."""
    from train import train

    results = train(["--model=tests.toy_detector.PatchColourDetector", "--data.layout=embedded",
                     f"--data.root={embedded_root}", "--data.categories=parts_tray", "--data.image_size=128",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     "--wandb.mode=disabled", f"--run.output_root={tmp_path}"])
    checkpoint = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 0  # no training epoch, not even an empty one
    last = torch.load(results["run_dir"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for saved in (checkpoint, last):  # no optimiser state anywhere; the fitted state in both
        assert "optimizer_states" not in saved and int(saved["state_dict"]["model.fitted_patches"]) > 0
    metrics = json.loads((results["run_dir"] / "metrics.json").read_text())
    assert metrics["mean"]["all"]["image_AUROC"] > 0.7  # measured 0.736 (structural 0.868)


def test_an_uncalibrated_model_is_neither_exported_nor_used_to_predict(tmp_path):
    from lightning_modules.prediction import predict_folder
    from lightning_modules.resume import CheckpointError

    detector = DETECTORS["EfficientAD"]()
    with pytest.raises(CheckpointError, match="export with final.ckpt"):
        export_model(detector.model, tmp_path / "model.onnx", "onnx")
    with pytest.raises(CheckpointError, match="predict with final.ckpt"):
        predict_folder(detector, tmp_path, tmp_path / "out")
    assert not (tmp_path / "model.onnx").exists()
