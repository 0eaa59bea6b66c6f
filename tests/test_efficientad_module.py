"""EfficientAD's Lightning module: loss terms against hand computations, fitted statistics against
direct torch/numpy references, the penalty switch, and the teacher-weights contract."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning_modules.config_files import read_config
from lightning_modules.efficientad import EfficientAD, PenaltyImages, hard_feature_loss
from networks.backbones import weights_restored_later
from networks.efficientad import TEACHER_CHANNELS, PatchDescriptionNetwork, normalize_map
from networks.statistics import exact_quantile

SIZE = 128  # the smallest size the autoencoder supports; PDN maps are 24×24


@pytest.fixture(scope="module")
def module() -> EfficientAD:
    torch.manual_seed(0)
    return EfficientAD(teacher_pretrained=False, image_size=SIZE)


def write_images(folder, count: int, size=(40, 56)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        cv2.imwrite(str(folder / f"photo_{index}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ helpers
@pytest.mark.parametrize("count", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0])
def test_exact_quantile_matches_numpy_linear_interpolation(count, q):
    values = torch.randn(count, generator=torch.Generator().manual_seed(count))
    expected = np.quantile(values.double().numpy(), q)
    assert float(exact_quantile(values, q)) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_hard_feature_loss_is_the_mean_of_the_top_entries():
    values = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float().view(1, 4, 5, 5)
    # 0.9-quantile of 0..99 = 89.1 → the entries 90..99, mean 94.5; 0.999-quantile = 98.901 → only 99.
    assert float(hard_feature_loss(values, 0.9)) == pytest.approx(94.5)
    assert float(hard_feature_loss(values, 0.999)) == pytest.approx(99.0)
    random = torch.rand(2, 384, 6, 6, generator=torch.Generator().manual_seed(1))
    threshold = np.quantile(random.numpy().ravel().astype(np.float64), 0.999)
    expected = random.numpy()[random.numpy() >= threshold].mean()
    assert float(hard_feature_loss(random, 0.999)) == pytest.approx(expected, rel=1e-6)


def test_quantile_normalisation_maps_qa_to_zero_and_qb_to_a_tenth(module):
    q_low, q_high = torch.tensor(2.0), torch.tensor(6.0)
    assert normalize_map(torch.tensor([2.0, 6.0, 4.0]), q_low, q_high).tolist() == pytest.approx([0.0, 0.1, 0.05])
    module.model.map_quantiles.copy_(torch.tensor([1.0, 3.0, 0.5, 0.7]))
    try:
        st = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
        ae = torch.tensor([0.5, 0.7]).view(2, 1, 1, 1)
        assert module.model.combined_map(st, ae).flatten().tolist() == pytest.approx([0.0, 0.1])
    finally:
        module.model.map_quantiles.zero_()


# ------------------------------------------------------------------------------------ fitted statistics
def test_teacher_statistics_are_population_mean_and_std_over_images_and_positions():
    torch.manual_seed(0)
    detector = EfficientAD(teacher_pretrained=False, image_size=SIZE)
    batches = [{"image": torch.rand(3, 3, SIZE, SIZE)}, {"image": torch.rand(2, 3, SIZE, SIZE)}]
    detector.fit_training_statistics(batches)
    with torch.no_grad():
        outputs = torch.cat([detector.model.teacher(b["image"]) for b in batches]).double()
    expected_mean = outputs.mean(dim=(0, 2, 3))
    expected_std = outputs.permute(1, 0, 2, 3).reshape(TEACHER_CHANNELS, -1).std(dim=1, correction=0)
    assert torch.allclose(detector.model.teacher_mean.flatten().double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(detector.model.teacher_std.flatten().double(), expected_std, rtol=1e-5, atol=1e-6)
    assert detector.model.teacher_statistics_fitted
    normalized = detector.model.normalized_teacher(batches[0]["image"]).double()
    assert torch.allclose(normalized, (outputs[:3] - expected_mean.view(1, -1, 1, 1)) / expected_std.view(1, -1, 1, 1),
                          atol=1e-4)


def test_map_quantiles_come_from_the_pooled_validation_maps(module):
    generator = torch.Generator().manual_seed(0)
    collected = {"map_st": torch.rand(5, 400, generator=generator) * 3,
                 "map_ae": torch.rand(5, 400, generator=generator)}
    module.fit_calibration(collected, training_batches=[])
    try:
        expected = [np.quantile(collected[name].numpy().ravel(), level)
                    for name in ("map_st", "map_ae") for level in (0.9, 0.995)]
        assert module.model.map_quantiles.tolist() == pytest.approx(expected, rel=1e-6)
        assert module.run_info()["map_quantiles"]["autoencoder"] == pytest.approx(expected[2:], rel=1e-6)
    finally:
        module.model.map_quantiles.zero_()


def test_model_forward_returns_the_max_of_the_combined_full_size_map(module):
    """With identity statistics (μ 0, σ 1) and quantiles (0, 10) the normalised maps equal the raw ones."""
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    model = module.model
    model.set_teacher_statistics(torch.zeros(TEACHER_CHANNELS), torch.ones(TEACHER_CHANNELS))
    model.map_quantiles.copy_(torch.tensor([0.0, 10.0, 0.0, 10.0]))  # 0.1·(M − 0)/10 = M/100
    module.eval()
    try:
        with torch.no_grad():
            output = model(images)
            teacher = model.teacher(images)
            student = model.student(images)
            autoencoder = model.autoencoder(images)
    finally:
        model.map_quantiles.zero_()
        model.teacher_std.zero_()
    assert output.anomaly_map.shape == (2, 1, SIZE, SIZE)
    st = ((teacher - student[:, :TEACHER_CHANNELS]) ** 2).mean(1, keepdim=True)
    ae = ((autoencoder - student[:, TEACHER_CHANNELS:]) ** 2).mean(1, keepdim=True)
    expected = torch.nn.functional.interpolate(0.5 * st + 0.5 * ae, size=SIZE, mode="bilinear") / 100
    assert torch.allclose(output.anomaly_map, expected, rtol=1e-4, atol=1e-8)
    assert torch.allclose(output.image_score, expected.amax(dim=(1, 2, 3)))


def test_wrong_image_size_is_a_clear_error(module):
    with pytest.raises(ValueError, match="image_size"):
        module.model(torch.rand(1, 3, 256, 256))


# ------------------------------------------------------------------------------------ losses
def test_loss_terms_train_student_and_autoencoder_but_never_the_teacher(module):
    module.train()
    model = module.model
    assert not model.teacher.training and model.student.training and model.autoencoder.training
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.loss_terms(torch.rand(2, 3, SIZE, SIZE))
    assert set(terms) == {"loss_hard", "loss_ae", "loss_stae"}
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(p.grad is not None for p in model.autoencoder.parameters())
    module.zero_grad()


def test_penalty_is_off_without_a_folder_and_adds_the_student_output_energy_with_one(tmp_path):
    torch.manual_seed(0)
    plain = EfficientAD(teacher_pretrained=False, image_size=SIZE)
    assert plain.run_info()["penalty"] == "off"

    write_images(tmp_path / "photos" / "nested", 3)
    torch.manual_seed(0)
    penalized = EfficientAD(teacher_pretrained=False, image_size=SIZE, penalty_dir=str(tmp_path / "photos"),
                            penalty_num_workers=0)
    assert penalized.run_info()["penalty"].startswith("on:") and "(3 images)" in penalized.run_info()["penalty"]
    penalty = penalized.next_penalty_batch(2)
    assert penalty.shape == (2, 3, SIZE, SIZE) and 0 <= float(penalty.min()) and float(penalty.max()) <= 1

    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.manual_seed(1)
        without = penalized.loss_terms(images)
        torch.manual_seed(1)
        with_penalty = penalized.loss_terms(images, penalty)
        expected = (penalized.model.student(penalty)[:, :TEACHER_CHANNELS] ** 2).mean()
    assert "loss_penalty" not in without
    assert float(with_penalty["loss_penalty"]) == pytest.approx(float(expected), rel=1e-4)
    for name in without:
        assert float(with_penalty[name]) == pytest.approx(float(without[name]), rel=1e-4)
    total_difference = float(sum(with_penalty.values()) - sum(without.values()))
    assert total_difference == pytest.approx(float(expected), rel=1e-3)


def test_penalty_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        PenaltyImages(tmp_path / "no_such_folder", SIZE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        EfficientAD(teacher_pretrained=False, image_size=SIZE, penalty_dir=str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------ teacher weights
def test_teacher_weights_contract(tmp_path):
    with pytest.raises(ValueError, match="distill.py"):
        EfficientAD(teacher_pretrained=True, teacher_weights=None, image_size=SIZE)
    missing = tmp_path / "teacher_small.pth"
    with pytest.raises(FileNotFoundError, match="teacher_small.pth"):
        EfficientAD(teacher_pretrained=True, teacher_weights=str(missing), image_size=SIZE)
    with pytest.raises(ValueError, match="teacher_pretrained=false"):
        EfficientAD(teacher_pretrained=False, teacher_weights=str(missing), image_size=SIZE)
    with pytest.warns(UserWarning, match="RANDOM teacher"):
        fallback = EfficientAD(teacher_pretrained="auto", image_size=SIZE)
    assert fallback.weights_source.startswith("random teacher (fallback")


def test_teacher_weights_file_is_loaded_and_named_in_run_info(tmp_path):
    torch.manual_seed(5)
    source = PatchDescriptionNetwork("small", TEACHER_CHANNELS, padding=True)  # as distill.py trains it
    path = tmp_path / "teacher_small.pth"
    torch.save(source.state_dict(), path)
    detector = EfficientAD(teacher_weights=str(path), teacher_pretrained=True, image_size=SIZE)
    assert str(path.resolve()) in detector.run_info()["weights_source"]
    for name, value in source.state_dict().items():
        assert torch.equal(detector.model.teacher.state_dict()[name], value)


def test_rebuilding_for_a_checkpoint_looks_up_no_teacher_and_opens_no_penalty_folder(tmp_path):
    """evaluate.py, prediction, export and the benchmark rebuild a detector whose weights the checkpoint holds:
    neither the teacher file nor the penalty folder it was trained with needs to exist on this machine."""
    with weights_restored_later():
        detector = EfficientAD(teacher_pretrained=True, teacher_weights=str(tmp_path / "gone.pth"),
                               penalty_dir=str(tmp_path / "gone"), require_penalty=True, image_size=SIZE)
    assert detector.weights_source == "restored from checkpoint" and detector.penalty_images is None
    with pytest.raises(FileNotFoundError, match="gone.pth"):  # outside the block, the file is needed again
        EfficientAD(teacher_pretrained=True, teacher_weights=str(tmp_path / "gone.pth"), image_size=SIZE)


# ------------------------------------------------------------------------------------ configs
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.parent.name in ("efficientad", "puad")], ids=str)
def test_configs_name_only_real_arguments(config):
    from datamodules.datamodule import AnomalyDataModule

    content = read_config(config)
    module_name, class_name = content["model"]["class_path"].rsplit(".", 1)
    detector = getattr(importlib.import_module(module_name), class_name)
    assert detector.__name__ == {"efficientad": "EfficientAD", "puad": "PUAD"}[config.parent.name]
    assert set(content["model"]["init_args"]) <= set(inspect.signature(detector).parameters)
    assert set(content["data"]) <= set(inspect.signature(AnomalyDataModule).parameters)
    assert "image_size" not in content["model"]["init_args"]  # one key, data.image_size; the model takes it
    if config.stem == "quickstart":
        assert content["model"]["init_args"]["teacher_pretrained"] is False and content["data"]["layout"] == "embedded"
    else:
        assert content["trainer"]["max_steps"] == 70000 and content["data"]["train_batch_size"] == 1


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.parent.name in ("efficientad", "puad")], ids=str)
def test_paper_configs_refuse_to_start_without_the_penalty_images(config, tmp_path, mvtec_ad_root):
    """The official code always trains with the ImageNet penalty: the paper configs must not drop it silently."""
    from train import train

    args = ["--config", str(config), "--data.layout=mvtec_ad", f"--data.root={mvtec_ad_root}",
            "--data.categories=bottle", f"--run.output_root={tmp_path / 'runs'}", "--wandb.mode=disabled"]
    if config.stem == "quickstart":
        assert read_config(config)["model"]["init_args"]["penalty_dir"] is None
        return
    assert read_config(config)["model"]["init_args"]["require_penalty"] is True
    with pytest.raises(ValueError, match=r"penalty_dir is null.*require_penalty=false"):
        train(args)
    # Dropping the term on purpose gets past that check (and stops at the next missing file, the teacher).
    with pytest.raises((FileNotFoundError, ValueError), match="Teacher weights file not found"):
        train(args + ["--model.init_args.require_penalty=false"])
