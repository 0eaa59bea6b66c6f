"""ULSAD networks: fusion, distance, attention against hand computations; shapes and the FRN/AE layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from networks.ulsad import (
    FeatureReconstructionNetwork,
    GlobalAutoencoder,
    ULSADModel,
    attention_pool,
    feature_distance,
    fuse_features,
)


def test_fuse_features_averages_groups_of_four_channels_by_hand():
    torch.manual_seed(0)
    layer2, layer3 = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)  # same size: no resampling
    fused = fuse_features(layer2, layer3, out_channels=4)
    assert fused.shape == (2, 4, 3, 3)
    stacked = torch.cat([layer2, layer3], dim=1)
    for j in range(4):
        expected = (
            stacked[:, 4 * j] + stacked[:, 4 * j + 1] + stacked[:, 4 * j + 2] + stacked[:, 4 * j + 3]
        ) / 4
        torch.testing.assert_close(fused[:, j], expected)


def test_fuse_features_upsamples_layer3_to_layer2_size():
    torch.manual_seed(1)
    layer2, layer3 = torch.randn(1, 512, 8, 8), torch.randn(1, 1024, 4, 4)
    fused = fuse_features(layer2, layer3)
    assert fused.shape == (1, 384, 8, 8)
    torch.testing.assert_close(fused[:, 0], layer2[:, 0:4].mean(dim=1))  # channels 0–127 come from layer2
    upsampled = F.interpolate(layer3, size=(8, 8), mode="bilinear", align_corners=False)
    # output channel 200 = mean of concatenated channels 800..803 = layer3 channels 288..291
    torch.testing.assert_close(fused[:, 200], upsampled[:, 288:292].mean(dim=1))
    constant = torch.arange(1024.0).view(1, 1024, 1, 1).expand(1, 1024, 4, 4)
    fused_constant = fuse_features(torch.zeros(1, 512, 8, 8), constant)
    assert fused_constant[0, 383, 5, 2].item() == pytest.approx((1020 + 1021 + 1022 + 1023) / 4)


def test_feature_distance_matches_hand_computation():
    torch.manual_seed(2)
    x, y = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    distance = feature_distance(x, y, cosine_weight=0.5)
    assert distance.shape == (2, 2, 2)
    for b in range(2):
        for h in range(2):
            for w in range(2):
                u, v = x[b, :, h, w].tolist(), y[b, :, h, w].tolist()
                squared = sum((a - c) ** 2 for a, c in zip(u, v)) / 3
                cosine = sum(a * c for a, c in zip(u, v)) / (
                    math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v))
                )
                assert distance[b, h, w].item() == pytest.approx(squared + 0.5 * (1 - cosine), rel=1e-5)
    torch.testing.assert_close(feature_distance(x, y, 0.0), ((x - y) ** 2).mean(dim=1))


def test_feature_distance_is_float32_under_bf16_autocast():
    x, y = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = feature_distance(x.bfloat16(), y.bfloat16(), 0.5)
    assert distance.dtype == torch.float32


def test_attention_pool_matches_an_explicit_softmax_loop():
    torch.manual_seed(3)
    query, key_value = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 2, 3)
    pooled = attention_pool(query, key_value)
    assert pooled.shape == (2, 5, 2, 3)
    for b in range(2):
        keys = [key_value[b, :, h, w] for h in range(2) for w in range(3)]
        for h in range(2):
            for w in range(3):
                q = query[b, :, h, w]
                logits = torch.stack([torch.dot(q, k) / math.sqrt(5) for k in keys])
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                expected = sum(weight * k for weight, k in zip(weights, keys))
                torch.testing.assert_close(pooled[b, :, h, w], expected, rtol=1e-5, atol=1e-6)


def test_attention_pool_sends_gradients_to_the_query_only():
    query = torch.randn(1, 4, 3, 3, requires_grad=True)
    key_value = torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = attention_pool(query, key_value)
    assert pooled.dtype == torch.float32
    pooled.square().sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_frn_shapes_and_final_relu_flag():
    torch.manual_seed(4)
    features = torch.randn(2, 32, 16, 16)  # the same layout at 1/12 of the width, to stay fast
    with_relu = FeatureReconstructionNetwork(32)
    output = with_relu(features)
    assert output.shape == (2, 64, 16, 16)
    assert output.min() >= 0 and (output > 0).any()
    without_relu = FeatureReconstructionNetwork(32, final_relu=False)
    assert (without_relu(features) < 0).float().mean() > 0.2


def test_full_frn_parameter_count():
    with torch.device("meta"):  # 65 M parameters: count them without allocating or initialising
        frn = FeatureReconstructionNetwork()
    convs = [(384, 768, 3), (768, 1536, 3), (1536, 1536, 3), (1536, 768, 4), (768, 384, 4), (384, 768, 5)]
    expected = sum(cin * cout * k * k + cout + 2 * cout for cin, cout, k in convs)  # conv + bias + BN affine
    assert sum(parameter.numel() for parameter in frn.parameters()) == expected == 65_487_744
    assert [
        conv.stride[0]
        for conv in frn.modules()
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ] == [
        2,
        2,
        1,
        2,
        2,
        1,
    ]


def test_frn_uses_xavier_uniform_with_leaky_relu_gain():
    frn = FeatureReconstructionNetwork(32)
    last = frn.decoder[2][0]  # deconv5×5 32→64: fan_in = 64·25, fan_out = 32·25 for a transposed conv
    bound = math.sqrt(2 / (1 + 0.01**2)) * math.sqrt(6 / (64 * 25 + 32 * 25))
    assert 0.95 * bound < last.weight.abs().max().item() <= bound
    first = frn.encoder[0][0]  # conv3×3 32→64: fan_in = 32·9, fan_out = 64·9
    bound = math.sqrt(2 / (1 + 0.01**2)) * math.sqrt(6 / (32 * 9 + 64 * 9))
    assert 0.95 * bound < first.weight.abs().max().item() <= bound


@pytest.mark.parametrize("image_size", [256, 128])
def test_global_autoencoder_output_matches_feature_size(image_size):
    autoencoder = GlobalAutoencoder(384, image_size)
    assert autoencoder(torch.rand(2, 3, image_size, image_size)).shape == (
        2,
        384,
        image_size // 8,
        image_size // 8,
    )
    norms = [module for module in autoencoder.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert len(norms) == 12 and all(not norm.affine and norm.eps == 1e-4 for norm in norms)


def test_global_autoencoder_layout_at_256():
    autoencoder = GlobalAutoencoder()
    assert autoencoder.decoder_sizes == [3, 8, 15, 31, 63] and autoencoder.last_size == 32
    assert autoencoder.enconv6[0].kernel_size == (8, 8)
    assert not hasattr(autoencoder, "deconv6")
    assert 1.0e6 < sum(parameter.numel() for parameter in autoencoder.parameters()) < 1.1e6
    with pytest.raises(ValueError, match="multiple of 64"):
        GlobalAutoencoder(image_size=100)


@pytest.fixture(scope="module")
def small_network() -> ULSADModel:
    torch.manual_seed(5)
    network = ULSADModel(
        "resnet18", ["layer2", "layer3"], pretrained=False, image_size=128, frn_hidden_scale=0.125
    )
    network.set_feature_statistics(torch.full((384,), 0.5), torch.full((384,), 2.0))
    return network


def test_network_needs_fitted_statistics_and_standardises_with_them():
    network = ULSADModel("resnet18", pretrained=False, image_size=128, feature_channels=96)
    images = torch.rand(2, 3, 128, 128)
    assert not network.feature_statistics_fitted and network.weights_source == "random (pretrained=False)"
    assert not network.is_calibrated()  # callers (testing, prediction, export) refuse it
    with pytest.raises(ValueError, match=r"channels \[7\]"):
        std = torch.ones(96)
        std[7] = float("nan")
        network.set_feature_statistics(torch.zeros(96), std)
    # A channel constant over the training set (std 0) is standardised with std 1 and counted.
    std = torch.ones(96)
    std[3] = 0
    network.set_feature_statistics(torch.zeros(96), std)
    assert int(network.constant_feature_channels) == 1 and float(network.feature_std[0, 3]) == 1.0
    mean, std = torch.randn(96), torch.rand(96) + 0.5
    network.set_feature_statistics(mean, std)
    raw = network.extract_features(images)
    assert raw.shape == (2, 96, 16, 16) and raw.dtype == torch.float32 and raw.grad_fn is None
    torch.testing.assert_close(
        network.standardize(raw), (raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    )
    assert {"feature_mean", "feature_std"} <= network.state_dict().keys()
    assert network.feature_mean.shape == (1, 96, 1, 1) and network.feature_mean.dtype == torch.float32


def test_network_shapes_at_256():
    network = ULSADModel("resnet18", pretrained=False, image_size=256, frn_hidden_scale=0.125).eval()
    network.set_feature_statistics(torch.zeros(384), torch.ones(384))
    outputs = network.branch_outputs(torch.rand(1, 3, 256, 256))
    assert outputs["features"].shape == (1, 384, 32, 32)
    assert outputs["local"].shape == outputs["global_support"].shape == (1, 384, 32, 32)  # R = 768×32×32
    assert outputs["autoencoder"].shape == (1, 384, 32, 32)


def test_network_at_128_trains_only_frn_and_autoencoder(small_network):
    small_network.train()
    assert not small_network.feature_extractor.training
    outputs = small_network.branch_outputs(torch.rand(2, 3, 128, 128))
    assert {key: tuple(value.shape) for key, value in outputs.items()} == {
        "features": (2, 384, 16, 16),
        "local": (2, 384, 16, 16),
        "global_support": (2, 384, 16, 16),
        "autoencoder": (2, 384, 16, 16),
    }
    assert outputs["features"].grad_fn is None
    trainable = {name.split(".")[0] for name, p in small_network.named_parameters() if p.requires_grad}
    assert trainable == {"frn", "autoencoder"}


def test_cached_features_give_the_same_outputs(small_network):
    small_network.eval()
    images = torch.rand(2, 3, 128, 128)
    direct = small_network.branch_outputs(images)
    cached = small_network.branch_outputs(images, features_raw=small_network.extract_features(images))
    for key in direct:
        torch.testing.assert_close(direct[key], cached[key])


def test_network_runs_under_bf16_autocast(small_network):
    small_network.train()
    images = torch.rand(2, 3, 128, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = small_network.branch_outputs(images)
        loss = feature_distance(outputs["features"], outputs["local"], 0.5).mean()
        loss = (
            loss
            + feature_distance(
                attention_pool(outputs["features"], outputs["features"]),
                attention_pool(outputs["autoencoder"], outputs["features"]),
                0.5,
            ).mean()
        )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert small_network.autoencoder.deconv8.weight.grad.abs().sum() > 0


def test_network_rejects_wrong_image_size_and_layer_stride(small_network):
    with pytest.raises(ValueError, match="128px"):
        small_network(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="128px"):
        small_network.branch_outputs(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="stride 8"):
        ULSADModel(
            "resnet18", ["layer3", "layer4"], pretrained=False, image_size=128, frn_hidden_scale=0.125
        )


def test_feature_channels_can_average_but_not_invent_channels():
    with pytest.raises(ValueError, match=r"feature_channels=400 exceeds the 384 channels .*\(128 \+ 256\).*at most 384"):
        ULSADModel("resnet18", pretrained=False, image_size=128, feature_channels=400)
    network = ULSADModel("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pretrained=False, image_size=128,
                           feature_channels=152, frn_hidden_scale=0.25)
    assert network.extract_features(torch.rand(1, 3, 128, 128)).shape == (1, 152, 16, 16)


@pytest.mark.parametrize("use_attention_loss", [True, False])
def test_without_the_tie_loss_the_global_map_is_the_distance_the_global_branch_was_trained_on(use_attention_loss):
    """Table 3 rows without the tie loss (issue 11): with the attention loss ("att") the global branch learned the
    attention consistency, so the map is D(SA(F), CA(A, F)); with its feature-distance variant ("feat", rows 2 and
    7) it learned D(F, A), and the map must be that, not the attention distance."""
    torch.manual_seed(0)
    network = ULSADModel("resnet18", pretrained=False, image_size=128, feature_channels=64, use_tie_loss=False,
                         use_attention_loss=use_attention_loss, map_blur_sigma=0.0, attention_cosine_weight=0.25)
    network.set_feature_statistics(torch.zeros(64), torch.ones(64))
    network.eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        _, global_map = network.raw_maps(images)
        outputs = network.branch_outputs(images)
        features, autoencoder = outputs["features"], outputs["autoencoder"]
        if use_attention_loss:
            expected = feature_distance(attention_pool(features, features), attention_pool(autoencoder, features), 0.25)
        else:
            expected = feature_distance(features, autoencoder, 0.25)
        expected = F.interpolate(expected[:, None], size=(128, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(global_map, expected)
