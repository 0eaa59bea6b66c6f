"""CRAD (spec ../shared/specs/crad.md): coordinates, grid sampling, jitter, the MobileNetV3 fusion, the refinement
rule, scoring, sizes and parameter counts, the loss variants and the optimiser, checked against the spec's
formulas (hand values, or the official forward written out with torch.nn.functional)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning_modules.config_files import read_config
from lightning_modules.crad import CRAD
from networks.crad import CRADModel, box_smooth, refine, sample_global_grid, sample_local_grid

SIZE = 64  # Lite0 blocks.2 + blocks.4: 152 channels at 8×8
SMALL = {"backbone": "tf_efficientnet_lite0", "pretrained": False, "image_size": SIZE, "blocks": 2,
         "smoothing_size": 5, "score_pool_size": 9}


def small_model(**overrides) -> CRADModel:
    torch.manual_seed(0)
    return CRADModel(**{**SMALL, **overrides})


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- coordinates
def test_coordinates_lie_strictly_inside_minus_one_one_before_jitter():
    model = small_model()
    for layer in model.modules():  # spread the coordinates over the whole square (the init keeps them near 0)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(layer.weight, std=0.15)
    features = model.extract_features(images(6)) * 3
    local, global_ = model.coordinates(features)
    assert local.shape == (6, 2, 8, 8) and global_.shape == (6, 2)
    for values in (local, global_):
        assert bool((values > -1).all() and (values < 1).all())
    assert float(local.abs().max()) > 0.5  # the test sees coordinates far from the centre, not only ≈ 0


def test_initial_coordinates_sit_near_the_grid_centres_as_the_spec_says():
    """Spec §2a: N(0, 0.01²) weights, zero biases, so coordinates start at about ±0.02."""
    model = small_model()
    local, global_ = model.coordinates(model.extract_features(images(4)))
    assert float(local.abs().max()) < 0.1 and float(global_.abs().max()) < 0.1
    for layer in (model.local_coordinates[0], model.global_coordinates[2], model.recover):
        assert float(layer.weight.std()) == pytest.approx(0.01, rel=0.2)
        assert layer.bias is None or float(layer.bias.abs().max()) == 0.0
    # xavier_normal_ on 1×C×R×R: std = sqrt(2 / (C·R² + R²))
    assert float(model.local_grid.std()) == pytest.approx(math.sqrt(2 / (152 * 64 + 64)), rel=0.05)
    assert float(model.global_grid.std()) == pytest.approx(math.sqrt(2 / (152 * 64 * 16 + 16)), rel=0.05)


# ----------------------------------------------------------------------------------------------- sampling
def test_local_grid_sampling_is_bilinear_with_align_corners_false_and_zero_padding():
    """A 2×2 grid [[a, b], [c, d]]; the continuous index of coordinate u is ((u + 1)·R − 1)/2 (spec §2c)."""
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    grid = torch.tensor([[[[a, b], [c, d]]]])
    coordinates = torch.tensor([0.0, 0.0, 0.25, -0.5, 0.9, -0.5, -0.5, 0.5]).reshape(1, 4, 1, 2).permute(0, 3, 1, 2)
    # (u, v) pairs along the width: (0, 0), (0.25, −0.5), (0.9, −0.5), (−0.5, 0.5)
    sampled = sample_local_grid(grid, coordinates.reshape(1, 2, 1, 4))
    expected = [
        (a + b + c + d) / 4,            # the centre: index (0.5, 0.5)
        0.25 * a + 0.75 * b,            # index x = 0.75, y = 0 (row a b)
        0.6 * b,                        # x = 1.4: 60% of b, 40% of the zero padding beyond it
        c,                              # x = 0, y = 1: the cell centre of c
    ]
    torch.testing.assert_close(sampled.flatten(), torch.tensor(expected))


def test_global_grid_cells_hold_whole_maps_read_in_channel_height_width_order():
    channels, height, width, resolution = 2, 2, 3, 2
    maps = torch.arange(resolution * resolution * channels * height * width, dtype=torch.float32)
    maps = maps.reshape(resolution, resolution, channels, height, width)  # cell (row, col) holds a C×H×W map
    grid = maps.permute(2, 3, 4, 0, 1).reshape(1, channels * height * width, resolution, resolution)
    # cell (0, 0), cell (0, 1), the middle, and beyond cell (0, 1)'s centre towards the zero padding (x = 1.4)
    coordinates = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.0, 0.0], [0.9, -0.5]])
    sampled = sample_global_grid(grid, coordinates, (channels, height, width))
    assert sampled.shape == (4, channels, height, width)
    torch.testing.assert_close(sampled[3], 0.6 * maps[0, 1])
    torch.testing.assert_close(sampled[0], maps[0, 0])
    torch.testing.assert_close(sampled[1], maps[0, 1])
    torch.testing.assert_close(sampled[2], maps.mean(dim=(0, 1)))


# ----------------------------------------------------------------------------------------------- jitter
def test_jitter_moves_only_the_local_coordinates_and_only_in_training():
    model = small_model(jitter_probability=1.0, grids="both")
    features = model.extract_features(images(2))
    channels = model.channels
    model.eval()
    first, second = model.sample_grids(features), model.sample_grids(features)
    torch.testing.assert_close(first, second)  # eval: no noise
    model.train()
    jittered = model.sample_grids(features)
    assert not torch.allclose(jittered[:, channels:], first[:, channels:])  # f^l moved
    torch.testing.assert_close(jittered[:, :channels], first[:, :channels])  # f^g never jittered


def test_jitter_has_the_spec_std_and_fires_for_about_half_of_the_batches():
    model = small_model()
    local = torch.zeros(4, 2, 8, 8)
    model.train()
    torch.manual_seed(1)
    draws = [model.jitter(local) for _ in range(400)]
    fired = [noise for noise in draws if bool(noise.abs().sum() > 0)]
    assert 160 <= len(fired) <= 240  # Bernoulli(0.5) per batch, the whole batch at once
    assert float(torch.stack(fired).std()) == pytest.approx(0.05, rel=0.05)
    model.eval()
    assert all(bool((model.jitter(local) == 0).all()) for _ in range(50))
    assert bool((small_model(jitter_std=0.0).train().jitter(local) == 0).all())


# ----------------------------------------------------------------------------------------------- refinement
def test_refinement_rule_on_a_hand_made_example():
    """Four pixels of two channels (x = features, f = reconstruction); spec §3 with 0.3 / 0.7 / 0.05:
    M = 1 where mean_c (f − x)² ≤ 10, S = 0.3·M + 0.7·cos, x̂ = S·x + (1 − S)·f."""
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[0.0, 1.0], [6.0, 6.0], [-2.0, 0.0], [0.0, 1.0 + math.sqrt(24.0)]])
    # errors 1, 25, 8, 12 → M = 1, 0, 1, 0; cos = 0, 1, −1, 1 → S = 0.3, 0.7, −0.4, 0.7
    similarity = torch.tensor([0.3, 0.7, -0.4, 0.7])[:, None]
    expected = similarity * x + (1 - similarity) * f
    torch.testing.assert_close(expected[0], torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(expected[1], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(expected[2], torch.tensor([-3.6, 0.0]))
    as_maps = lambda rows: rows.T.reshape(1, 2, 2, 2)  # pixels → a 2×2 map of 2 channels
    refined = refine(as_maps(x), as_maps(f))
    torch.testing.assert_close(refined, as_maps(expected))


def test_the_cosine_term_passes_gradient_and_the_gate_does_not():
    features = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    reconstruction = (features + 0.5 * torch.randn(1, 4, 3, 3)).requires_grad_()
    refine(features, reconstruction).pow(2).sum().backward()
    # x̂ = S·x + (1 − S)·f with S through the cosine: the gradient differs from the S-constant one, (1 − S)·2x̂
    with torch.no_grad():
        cosine = F.cosine_similarity(reconstruction, features, dim=1)[:, None]
        similarity = 0.3 + 0.7 * cosine  # every error here is < 10: M = 1
        refined = similarity * features + (1 - similarity) * reconstruction
        constant_s = (1 - similarity) * 2 * refined
    assert not torch.allclose(reconstruction.grad, constant_s, atol=1e-4)


# ----------------------------------------------------------------------------------------------- scoring
def test_scoring_is_the_spec_formula_upsample_box_filter_window_max():
    model = small_model(smoothing_size=21, score_pool_size=32, image_size=64).eval()
    with torch.no_grad():
        features = model.extract_features(images(2))
        reconstruction = model.reconstruct(features)
        output = model.maps_and_score(features, reconstruction)
        refined = refine(features, reconstruction)
        disparity = torch.sqrt(((refined - features) ** 2).sum(dim=1, keepdim=True))
        upsampled = torch.nn.UpsamplingBilinear2d(scale_factor=8)(disparity)
        smoothed = F.avg_pool2d(upsampled, 21, stride=1, padding=10)
        score = F.avg_pool2d(smoothed, 32, stride=1).flatten(1).max(dim=1).values
    torch.testing.assert_close(output.anomaly_map, smoothed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.image_score, score, rtol=1e-5, atol=1e-6)


def test_box_smoothing_counts_the_zero_padding():
    maps = torch.ones(1, 1, 30, 30)
    smoothed = box_smooth(maps, 21)
    assert float(smoothed[0, 0, 0, 0]) == pytest.approx(11 * 11 / 441)
    assert float(smoothed[0, 0, 15, 15]) == pytest.approx(1.0)


def test_without_refinement_the_disparity_is_the_reconstruction_error():
    model = small_model(refinement=False, smoothing_size=1, score_pool_size=1).eval()
    with torch.no_grad():
        features = model.extract_features(images(1))
        reconstruction = model.reconstruct(features)
        output = model.maps_and_score(features, reconstruction)
        error = (reconstruction - features).norm(dim=1, keepdim=True)
    expected = F.interpolate(error, size=(SIZE, SIZE), mode="bilinear", align_corners=True)
    torch.testing.assert_close(output.anomaly_map, expected)


# ----------------------------------------------------------------------------------------------- the official forward
def _official_bottleneck(x, state, prefix):
    """The official MobileBottleneck in eval mode, from its weights (spec §3), written with F."""
    def bn(value, name):
        return F.batch_norm(value, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    def hswish(value):
        return value * F.relu6(value + 3) / 6

    hidden = hswish(bn(F.conv2d(x, state[f"{prefix}.expand.0.weight"]), f"{prefix}.expand.1"))
    expansion = hidden.shape[1]
    hidden = bn(F.conv2d(hidden, state[f"{prefix}.depthwise.0.weight"], padding=1, groups=expansion),
                f"{prefix}.depthwise.1")
    squeeze = F.relu(F.linear(hidden.mean(dim=(2, 3)), state[f"{prefix}.excitation.0.weight"]))
    hidden = hidden * (F.relu6(F.linear(squeeze, state[f"{prefix}.excitation.2.weight"]) + 3) / 6)[:, :, None, None]
    return x + bn(F.conv2d(hswish(hidden), state[f"{prefix}.project.0.weight"]), f"{prefix}.project.1")


def test_reconstruction_equals_the_official_forward_written_out():
    """The spec's pseudo-forward (§9) with the official code's tensor manipulations (repeat, view(1, B, 1, 2),
    permute(2, 3, 0, 1).view(B, −1, H, W)), from the model's weights, in eval mode."""
    model = small_model()
    for module in model.fusion.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) and layer not in model.feature_extractor.modules():
            torch.nn.init.normal_(layer.weight, std=0.1)
    model.eval()
    state = model.state_dict()
    with torch.no_grad():
        x = model.extract_features(images(3))
        batch, _, height, width = x.shape
        coord_global = torch.tanh(F.linear(torch.tanh(F.linear(F.adaptive_avg_pool2d(x, 1).view(batch, -1),
                                                               state["global_coordinates.0.weight"],
                                                               state["global_coordinates.0.bias"])),
                                           state["global_coordinates.2.weight"], state["global_coordinates.2.bias"]))
        coord_local = torch.tanh(F.conv2d(torch.tanh(F.conv2d(x, state["local_coordinates.0.weight"],
                                                              state["local_coordinates.0.bias"])),
                                          state["local_coordinates.2.weight"], state["local_coordinates.2.bias"]))
        query = torch.cat([
            F.grid_sample(state["global_grid"], coord_global.view(1, batch, 1, 2), align_corners=False)
            .permute(2, 3, 0, 1).reshape(batch, -1, height, width),
            F.grid_sample(state["local_grid"].repeat(batch, 1, 1, 1), coord_local.permute(0, 2, 3, 1),
                          align_corners=False),
        ], dim=1)
        for index in range(len(model.fusion)):
            query = _official_bottleneck(query, state, f"fusion.{index}")
        expected = F.conv2d(query, state["recover.weight"])
        reconstruction = model.reconstruct(x)
    assert float(coord_local.abs().max()) > 0.3  # the comparison covers coordinates away from the centre
    torch.testing.assert_close(reconstruction, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(("ratio", "block", "total"), [(2.0, 1_131_840, 15_361_492), (0.5, 213_624, 5_261_116)],
                         ids=["CRAD", "CRAD-S"])
def test_paper_sizes_and_parameter_counts_equal_the_spec(ratio, block, total):
    """Spec §8 at 224 px with b4 blocks.2 + blocks.4 (216×28×28): grids 13,824 + 2,709,504, coordinate MLPs
    47,306 each, 11 bottlenecks of 432 channels (E = 864 or 216), recover 93,312."""
    torch.manual_seed(0)
    model = CRADModel(backbone="tf_efficientnet_b4", pretrained=False, image_size=224, expansion_ratio=ratio)
    assert (model.channels, model.feature_size) == (216, 28)
    assert model.local_grid.numel() == 13_824 and model.global_grid.numel() == 2_709_504
    assert trainable(model.local_coordinates) == trainable(model.global_coordinates) == 47_306
    assert len(model.fusion) == 11 and all(trainable(b) == block for b in model.fusion)
    assert trainable(model.recover) == 93_312
    assert trainable(model) == total
    model.eval()
    with torch.no_grad():
        features = model.extract_features(torch.rand(1, 3, 224, 224))
        fused_input = model.sample_grids(features)
        fused = model.fusion(fused_input)
        reconstruction = model.reconstruct(features)
        output = model.maps_and_score(features, reconstruction)
    assert features.shape == (1, 216, 28, 28)
    assert fused_input.shape == fused.shape == (1, 432, 28, 28)
    assert reconstruction.shape == model.refined(features, reconstruction).shape == (1, 216, 28, 28)
    assert output.anomaly_map.shape == (1, 1, 224, 224) and output.image_score.shape == (1,)


@pytest.mark.parametrize(("image_size", "grids"), [(64, "both"), (96, "both"), (64, "local"), (64, "global")])
def test_grid_and_fusion_sizes_follow_the_image_the_backbone_and_the_grids(image_size, grids):
    model = small_model(image_size=image_size, grids=grids, local_grid_size=6, global_grid_size=3,
                        expansion_ratio=0.5)
    side = image_size // 8
    assert (model.channels, model.feature_size) == (40 + 112, side)
    assert (model.local_grid is None) == (grids == "global")
    assert (model.global_grid is None) == (grids == "local")
    if model.local_grid is not None:
        assert model.local_grid.shape == (1, 152, 6, 6)
    if model.global_grid is not None:
        assert model.global_grid.shape == (1, 152 * side * side, 3, 3)
    width = 152 * (2 if grids == "both" else 1)
    assert model.fusion[0].expand[0].in_channels == width and model.fusion[0].expand[0].out_channels == width // 2
    output = model.eval()(torch.rand(2, 3, image_size, image_size))
    assert output.anomaly_map.shape == (2, 1, image_size, image_size)


def test_bad_settings_are_refused_clearly():
    with pytest.raises(ValueError, match="grids must be one of"):
        small_model(grids="neither")
    with pytest.raises(ValueError, match="smoothing_size must be odd"):
        small_model(smoothing_size=4)
    with pytest.raises(ValueError, match="multiple of the backbone layers' largest stride 16"):
        small_model(image_size=72)


# ----------------------------------------------------------------------------------------------- the module
def batch(count: int = 4, seed: int = 0) -> dict:
    return {"image": images(count, seed), "index": torch.arange(count), "label": torch.zeros(count, dtype=torch.long),
            "category": ["first"] * count}


@pytest.mark.parametrize("weighted", [True, False])
def test_loss_is_the_refined_mse_or_the_unweighted_variant(weighted):
    detector = CRAD(**SMALL, weighted_loss=weighted, jitter_std=0.0)
    detector.model.eval()  # BN on running statistics, so the reference below sees the same f^n
    loss = detector.loss_terms(batch())["loss_mse"]
    with torch.no_grad():
        x = detector.model.extract_features(batch()["image"])
        f = detector.model.reconstruct(x)
        cosine = F.cosine_similarity(f, x, dim=1)[:, None]
        gate = ((f - x).pow(2).mean(dim=1, keepdim=True) <= 10).float()
        weight = 1 - (0.3 * gate + 0.7 * cosine)
        expected = (weight**2 * (f - x) ** 2).mean() if weighted else ((f - x) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_optimiser_has_the_grid_group_at_lr_0_1_and_steps_per_epoch():
    detector = CRAD(**SMALL)
    configured = detector.build_optimizers(total_steps=100)
    network, grids = configured["optimizer"].param_groups
    assert (network["lr"], grids["lr"]) == (1e-3, 0.1)
    assert network["weight_decay"] == grids["weight_decay"] == 0.01
    assert {id(p) for p in grids["params"]} == {id(detector.model.local_grid), id(detector.model.global_grid)}
    backbone = {id(p) for p in detector.model.feature_extractor.parameters()}
    assert not backbone & {id(p) for p in network["params"]}
    assert sum(p.numel() for p in network["params"] + grids["params"]) == trainable(detector.model)
    scheduler = configured["lr_scheduler"]
    assert scheduler["interval"] == "epoch" and scheduler["scheduler"].step_size == 40
    assert CRAD.trainer_defaults == {"max_epochs": 50, "gradient_clip_val": 0.1}


def test_a_few_steps_lower_the_loss_and_eval_mode_agrees_with_training_mode():
    """On fixed random images: the loss falls, and the model in eval mode (BN running statistics, no jitter) is
    not worse than zeros would be (the OneNIP lesson: check eval-mode reconstruction, not only training loss)."""
    torch.manual_seed(0)
    detector = CRAD(**SMALL)
    optimizer = detector.build_optimizers(total_steps=30)["optimizer"]
    data = batch(8)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = detector.loss_terms(data)["loss_mse"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    detector.model.eval()
    with torch.no_grad():
        x = detector.model.extract_features(data["image"])
        eval_loss = float((detector.model.refined(x, detector.model.reconstruct(x)) - x).pow(2).mean())
        zeros_loss = float(x.pow(2).mean())
    assert eval_loss < 0.5 * zeros_loss


# ----------------------------------------------------------------------------------------------- configs
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "crad").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_configs_name_only_real_arguments_and_the_paper_configs_hold_the_spec_values(config):
    from datamodules.datamodule import AnomalyDataModule

    content = read_config(config)
    assert content["model"]["class_path"] == "lightning_modules.crad.CRAD"
    arguments = inspect.signature(CRAD).parameters
    assert set(content["model"]["init_args"]) <= set(arguments)
    assert set(content["data"]) <= set(inspect.signature(AnomalyDataModule).parameters)
    assert content["data"]["categories"] == "all"  # one unified model
    assert content["trainer"]["gradient_clip_val"] == 0.1 and content["trainer"]["max_epochs"] == 50
    if config.stem == "quickstart":
        assert content["data"]["layout"] == "embedded" and content["model"]["init_args"]["backbone"] == "tf_efficientnet_lite0"
        return
    spec = {"backbone": "tf_efficientnet_b4", "layers": ["blocks.2", "blocks.4"], "grids": "both",
            "local_grid_size": 8, "global_grid_size": 4, "blocks": 11, "expansion_ratio": 2.0, "jitter_std": 0.05,
            "jitter_probability": 0.5, "refinement": True, "weighted_loss": True, "gate_weight": 0.3,
            "cosine_weight": 0.7, "gate_scale": 0.05, "smoothing_size": 21, "score_pool_size": 32, "lr": 0.001,
            "grid_lr": 0.1, "weight_decay": 0.01, "lr_step_epochs": 40}
    assert {key: content["model"]["init_args"][key] for key in spec} == spec
    assert {key: arguments[key].default for key in spec if key != "layers"} == {k: v for k, v in spec.items() if k != "layers"}
    assert content["data"]["image_size"] == 224 and content["data"]["train_batch_size"] == 64
    if config.stem == "model":  # the detector half names no dataset: configs/data/<dataset>.yaml does
        assert "layout" not in content["data"] and "root" not in content["data"]
    else:
        assert content["data"]["layout"] == config.stem


def test_the_threshold_remembers_the_scoring_settings_it_was_fitted_under():
    from networks.anomaly_model import FittedSettingsMismatch

    detector = CRAD(**SMALL)
    validation = [batch(4, seed) for seed in (1, 2)]
    detector.calibrate(validation, [batch(4, 3)])
    assert detector.is_calibrated()
    state = detector.model.state_dict()
    for setting in ({"smoothing_size": 7}, {"score_pool_size": 5}, {"refinement": False}, {"gate_scale": 0.1}):
        other = small_model(**setting)
        with pytest.raises(FittedSettingsMismatch, match=next(iter(setting))):
            other.load_state_dict(state)
    small_model().load_state_dict(state)  # the same settings load
