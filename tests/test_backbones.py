"""Backbone weight resolution and the frozen feature extractor (offline, resnet18 with random weights)."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from networks import backbones
from networks.backbones import FeatureExtractor, ImageNetNormalize, resolve_pretrained_weights

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def random_resnet18_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False)
    # Give BN statistics non-trivial values so a load that skipped buffers would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return {key: value.clone() for key, value in model.state_dict().items()}


def reference_layers(
    state_dict: dict[str, torch.Tensor], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """layer2 / layer3 of a plain (non-features_only) timm resnet18, run stage by stage."""
    model = timm.create_model("resnet18", pretrained=False)
    model.load_state_dict(state_dict)
    model.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1((images - mean) / std))))
        layer2 = model.layer2(model.layer1(x))
        return layer2, model.layer3(layer2)


def test_imagenet_normalize_matches_hand_values_and_is_not_checkpointed():
    image = torch.zeros(1, 3, 2, 2)
    image[0, :, 0, 0] = torch.tensor([0.485, 1.0, 0.0])
    out = ImageNetNormalize()(image)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.0)
    assert out[0, 1, 0, 0].item() == pytest.approx((1.0 - 0.456) / 0.224)
    assert out[0, 2, 0, 0].item() == pytest.approx((0.0 - 0.406) / 0.225)
    assert ImageNetNormalize().state_dict() == {}


def test_random_extractor_shapes_order_and_frozen_state():
    extractor = FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=False)
    assert extractor.weights_source == "random (pretrained=False)"
    assert extractor.channels == [128, 256]
    assert extractor.reductions == [8, 16]
    layer2, layer3 = extractor(torch.rand(2, 3, 64, 64))
    assert layer2.shape == (2, 128, 8, 8) and layer3.shape == (2, 256, 4, 4)
    assert layer2.grad_fn is None

    extractor.train()
    assert not extractor.training and not any(module.training for module in extractor.modules())
    assert not any(parameter.requires_grad for parameter in extractor.parameters())
    assert extractor.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    swapped = FeatureExtractor("resnet18", ["layer3", "layer2"], pretrained=False)
    swapped.load_state_dict(extractor.state_dict())
    images = torch.rand(1, 3, 64, 64)
    deep, shallow = swapped(images)
    assert swapped.channels == [256, 128]
    torch.testing.assert_close(deep, extractor(images)[1])
    torch.testing.assert_close(shallow, extractor(images)[0])


def test_extractor_runs_under_bf16_autocast():
    extractor = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (layer2,) = extractor(torch.rand(2, 3, 64, 64))
    assert layer2.shape == (2, 128, 8, 8) and torch.isfinite(layer2.float()).all()


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"layer9.*'act1', 'layer1', 'layer2', 'layer3', 'layer4'"):
        FeatureExtractor("resnet18", ["layer2", "layer9"], pretrained=False)


def test_wide_resnet50_layers_map_to_the_ulsad_channels():
    extractor = FeatureExtractor("wide_resnet50_2.racm_in1k", ["layer2", "layer3"], pretrained=False)
    assert extractor.channels == [512, 1024] and extractor.reductions == [8, 16]


@pytest.fixture(scope="module")
def resnet18_weights() -> dict[str, torch.Tensor]:
    return random_resnet18_weights(seed=0)


def test_local_weights_file_gives_the_reference_outputs(tmp_path, resnet18_weights):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_weights, path)

    extractor = FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=True, weights_file=str(path))
    assert extractor.weights_source == f"file:{path.resolve()}"
    images = torch.rand(2, 3, 64, 64)
    expected2, expected3 = reference_layers(resnet18_weights, images)
    layer2, layer3 = extractor(images)
    torch.testing.assert_close(layer2, expected2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer3, expected3, rtol=1e-4, atol=1e-5)


def test_safetensors_file_is_read(tmp_path, resnet18_weights):
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet18_weights, str(path))
    state_dict, source = resolve_pretrained_weights("resnet18", True, str(path))
    assert source == f"file:{path.resolve()}"
    assert state_dict.keys() == resnet18_weights.keys()
    torch.testing.assert_close(
        state_dict["layer4.1.bn2.running_var"], resnet18_weights["layer4.1.bn2.running_var"]
    )


def test_lightning_style_checkpoint_is_unwrapped(tmp_path, resnet18_weights):
    weights = resnet18_weights
    path = tmp_path / "wrapped.ckpt.pt"
    torch.save({"state_dict": {f"model.{key}": value for key, value in weights.items()}, "epoch": 3}, path)
    state_dict, source = resolve_pretrained_weights("resnet18", "auto", str(path))
    assert source == f"file:{path.resolve()}"
    torch.testing.assert_close(state_dict["layer3.0.conv1.weight"], weights["layer3.0.conv1.weight"])


def test_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "wrn50.pth"
    for mode in (True, "auto"):
        with pytest.raises(FileNotFoundError, match="nowhere/wrn50.pth"):
            resolve_pretrained_weights("resnet18", mode, str(missing))


def test_weights_that_do_not_fit_name_the_source_and_key(tmp_path, resnet18_weights):
    weights = dict(resnet18_weights)
    del weights["layer2.0.conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"broken\.pth.*layer2\.0\.conv1\.weight"):
        FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=True, weights_file=str(path))


def test_wrong_suffix_is_rejected(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"\.npz"):
        resolve_pretrained_weights("resnet18", True, str(path))


def test_hf_cache_is_used_without_network(tmp_path, empty_caches, resnet18_weights):
    weights = resnet18_weights
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    (repo / "snapshots" / FAKE_COMMIT).mkdir(parents=True)
    save_file(weights, str(repo / "snapshots" / FAKE_COMMIT / "model.safetensors"))

    state_dict, source = resolve_pretrained_weights("resnet18", True, None)
    assert source == "cache:hf-hub:timm/resnet18.a1_in1k"
    torch.testing.assert_close(state_dict["fc.weight"], weights["fc.weight"])
    assert empty_caches == []  # no connection attempted


def test_pretrained_true_without_cache_or_network_fails_fast_and_clearly(empty_caches):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        resolve_pretrained_weights("resnet18", True, None)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "'resnet18'" in message and "timm/resnet18.a1_in1k" in message
    assert "not present" in message and "unreachable" in message
    assert "weights_file=" in message
    assert empty_caches == [("huggingface.co", 443)]


def test_offline_mode_skips_the_download(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="download: skipped"):
        resolve_pretrained_weights("resnet18", True, None)
    assert empty_caches == []


def test_auto_falls_back_to_random_weights_loudly(empty_caches, caplog):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        extractor = FeatureExtractor("resnet18", ["layer2"], pretrained="auto")
    assert extractor.weights_source == "random (fallback: no weights found)"
    assert any("RANDOM backbone weights" in record.message for record in caplog.records)


def test_pretrained_false_records_random_and_rejects_a_weights_file(tmp_path):
    assert resolve_pretrained_weights("resnet18", False, None) == (None, "random (pretrained=False)")
    with pytest.raises(ValueError, match="pretrained=False"):
        resolve_pretrained_weights("resnet18", False, str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="'yes'"):
        resolve_pretrained_weights("resnet18", "yes", None)


def test_architecture_alias_is_the_same_function():
    assert backbones.resolve_weights is resolve_pretrained_weights
