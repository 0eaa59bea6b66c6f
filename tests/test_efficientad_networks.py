"""EfficientAD / PUAD networks: exact parameter counts, shapes, and the two teacher weight layouts."""

from __future__ import annotations

import einops
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.efficientad import (
    EfficientADAutoencoder,
    PatchDescriptionNetwork,
    WideResNetDistillationTarget,
    load_teacher_state_dict,
    sequential_keys_to_named,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def nelson_pdn(size: str, out_channels: int = 384) -> nn.Sequential:
    """nelson1425/EfficientAD common.py get_pdn_small / get_pdn_medium (padding=False), written out independently."""
    if size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(128, 256, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(256, 256, 3), nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(3, 256, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(256, 512, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3), nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )  # fmt: skip


def count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_parameter_counts_match_the_spec():
    assert count(PatchDescriptionNetwork("small", 384)) == 2_694_144
    assert count(PatchDescriptionNetwork("medium", 384)) == 8_026_624
    assert count(PatchDescriptionNetwork("small", 768)) == 4_267_392
    assert count(PatchDescriptionNetwork("medium", 768)) == 11_615_488
    assert count(EfficientADAutoencoder()) == 1_096_320
    assert count(PatchDescriptionNetwork("small", 384, padding=True)) == 2_694_144


@pytest.mark.parametrize(("padding", "side"), [(False, 56), (True, 64)])
def test_pdn_output_size_at_256(padding, side):
    small = PatchDescriptionNetwork("small", 384, padding=padding)
    assert small(torch.rand(1, 3, 256, 256)).shape == (1, 384, side, side)
    with torch.device("meta"):  # PDN-M costs ~40 GFLOP at 256 px; shape propagation needs no numbers
        medium = PatchDescriptionNetwork("medium", 768, padding=padding)
        assert medium(torch.rand(1, 3, 256, 256)).shape == (1, 768, side, side)


def test_pdn_and_autoencoder_at_128_agree_in_size():
    images = torch.rand(1, 3, 128, 128)
    assert PatchDescriptionNetwork("small", 768)(images).shape == (1, 768, 24, 24)
    assert EfficientADAutoencoder(384, image_size=128).eval()(images).shape == (1, 384, 24, 24)


def test_autoencoder_layout_at_256_and_dropout_only_in_training():
    autoencoder = EfficientADAutoencoder()
    assert autoencoder.decoder.sizes == [3, 8, 15, 32, 63, 127] and autoencoder.decoder.last_size == 56
    assert EfficientADAutoencoder(padding=True).decoder.last_size == 64
    assert autoencoder.encoder.enconv6.kernel_size == (8, 8)
    images = torch.rand(1, 3, 256, 256)
    torch.manual_seed(0)
    trained = autoencoder.train()(images), autoencoder(images)
    assert trained[0].shape == (1, 384, 56, 56) and not torch.equal(*trained)
    autoencoder.eval()
    torch.testing.assert_close(autoencoder(images), autoencoder(images), rtol=0, atol=0)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_both_key_layouts_load_to_identical_outputs(tmp_path, size):
    torch.manual_seed(1)
    reference = nelson_pdn(size).eval()
    sequential_file = tmp_path / f"teacher_{size}.pth"
    torch.save(reference.state_dict(), sequential_file)

    from_sequential = PatchDescriptionNetwork(size)
    assert load_teacher_state_dict(from_sequential, sequential_file) == "nelson1425 sequential"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference((images - IMAGENET_MEAN) / IMAGENET_STD)
        torch.testing.assert_close(from_sequential(images), expected, rtol=1e-4, atol=1e-5)

    named_file = tmp_path / f"lightning_{size}.ckpt.pth"
    wrapped = {f"teacher.{key}": value for key, value in from_sequential.state_dict().items()}
    torch.save({"state_dict": wrapped}, named_file)
    from_named = PatchDescriptionNetwork(size)
    assert load_teacher_state_dict(from_named, named_file) == "named"
    with torch.no_grad():
        torch.testing.assert_close(from_named(images), from_sequential(images), rtol=0, atol=0)


def test_teacher_prefix_is_picked_among_several():
    teacher = PatchDescriptionNetwork("small")
    student = PatchDescriptionNetwork("small", 768)
    checkpoint = {f"model.teacher.{k}": v for k, v in teacher.state_dict().items()}
    checkpoint |= {f"model.student.{k}": v for k, v in student.state_dict().items()}
    fresh = PatchDescriptionNetwork("small")
    load_teacher_state_dict(fresh, checkpoint)
    torch.testing.assert_close(fresh.conv4.weight, teacher.conv4.weight, rtol=0, atol=0)
    student_copy = PatchDescriptionNetwork("small", 768)
    load_teacher_state_dict(student_copy, checkpoint, prefix="model.student.")
    torch.testing.assert_close(student_copy.conv4.bias, student.conv4.bias, rtol=0, atol=0)


def test_bad_layouts_raise_clear_errors(tmp_path):
    small = PatchDescriptionNetwork("small")
    with pytest.raises(ValueError, match=r"no PDN conv keys.*Accepted layouts"):
        load_teacher_state_dict(small, {"encoder.weight": torch.zeros(1)})
    bad = {
        "x.conv1.weight": small.conv1.weight,
        "x.conv1.bias": small.conv1.bias,
        "x.block0.weight": torch.zeros(1),
    }
    with pytest.raises(
        ValueError, match=r"missing keys \['conv2\.bias'.*unexpected keys \['block0\.weight'\]"
    ):
        load_teacher_state_dict(small, bad)
    with pytest.raises(ValueError, match=r"PDN-small weights but the module is a PDN-medium"):
        load_teacher_state_dict(PatchDescriptionNetwork("medium"), nelson_pdn("small").state_dict())
    with pytest.raises(ValueError, match=r"PDN-small weights but the module is a PDN-medium"):
        load_teacher_state_dict(PatchDescriptionNetwork("medium"), small.state_dict())
    with pytest.raises(
        ValueError, match=r"conv4\.weight: module \(384, 256, 4, 4\) vs file \(768, 256, 4, 4\)"
    ):
        load_teacher_state_dict(small, PatchDescriptionNetwork("small", 768).state_dict())
    with pytest.raises(ValueError, match=r"indices \[0, 3, 6\]"):
        load_teacher_state_dict(
            small, {k: v for k, v in nelson_pdn("small").state_dict().items() if k[0] != "8"}
        )
    with pytest.raises(ValueError, match=r"several prefixes"):
        load_teacher_state_dict(
            small,
            {f"a.{k}": v for k, v in small.state_dict().items()}
            | {f"b.{k}": v for k, v in small.state_dict().items()},
        )
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_teacher_state_dict(small, tmp_path / "absent.pth")


def test_sequential_keys_to_named_mapping():
    renamed = sequential_keys_to_named({"0.weight": 0, "10.bias": 1, "12.weight": 2}, "medium")
    assert renamed == {"conv1.weight": 0, "conv5.bias": 1, "conv6.weight": 2}
    with pytest.raises(ValueError, match="'10.weight'"):
        sequential_keys_to_named({"10.weight": 0}, "small")


def test_distillation_target_fuses_layer2_and_upsampled_layer3():
    target = WideResNetDistillationTarget(pretrained=False, backbone="resnet18", out_channels=96)
    assert target.weights_source == "random (pretrained=False)"
    images = torch.rand(1, 3, 128, 128)
    fused = target(images)
    assert fused.shape == (1, 96, 16, 16)
    layer2, layer3 = target.feature_extractor(images)
    upsampled = F.interpolate(layer3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
    expected = einops.reduce(torch.cat([layer2, upsampled], dim=1), "b (c g) h w -> b c h w", "mean", g=4)
    torch.testing.assert_close(fused, expected)
