"""ULSAD's LightningModule: loss terms, Table 3 ablation flags, fitted statistics (spec §4, §5, §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ulsad import ULSAD
from networks.ulsad import attention_pool

SIZE = 128


def make_detector(**overrides) -> ULSAD:
    """A weights-free, small ULSAD: resnet18's layer2+layer3 fuse to exactly 384 channels."""
    torch.manual_seed(0)
    args = {"backbone": "resnet18", "pretrained": False, "image_size": SIZE, "frn_hidden_scale": 0.25,
            "cache_features": False}
    args.update(overrides)
    detector = ULSAD(**args)
    detector.model.set_feature_statistics(torch.zeros(384), torch.ones(384))
    return detector


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, SIZE, SIZE, generator=generator)


def plain_distance(x, y, weight):
    """mean_c (x-y)^2 + w (1 - cos_c), written independently of networks.ulsad."""
    return ((x - y) ** 2).mean(1) + weight * (1 - F.cosine_similarity(x, y, dim=1))


def loss_inputs(detector: ULSAD, images: torch.Tensor):
    detector.train()
    torch.manual_seed(5)
    features = detector.model.standardize(detector.model.extract_features(images))
    return features


def test_model_forward_gives_map_at_256_px_and_its_maximum_as_score():
    detector = make_detector(image_size=256)
    detector.model.map_quantiles.copy_(torch.tensor([0.0, 1.0, 0.0, 2.0]))
    detector.eval()
    with torch.no_grad():
        output = detector.model(torch.rand(2, 3, 256, 256))
    assert output.anomaly_map.shape == (2, 1, 256, 256)
    assert torch.isfinite(output.anomaly_map).all()
    # the image score is the max of the map, as the reference does
    assert torch.equal(output.image_score, output.anomaly_map.amax(dim=(1, 2, 3)))


def test_local_cosine_weight_alpha_changes_local_loss_as_defined(images):
    with_cosine, without_cosine = make_detector(alpha_local=0.5), make_detector(alpha_local=0.0)
    features = loss_inputs(with_cosine, images)
    local, _ = with_cosine.model.frn(features).split(384, dim=1)
    terms_with = with_cosine.loss_terms(features, images)
    without_cosine.load_state_dict(with_cosine.state_dict())
    terms_without = without_cosine.loss_terms(features, images)
    assert terms_without["loss_local"].item() == pytest.approx(((features - local) ** 2).mean().item(), rel=1e-4)
    assert terms_with["loss_local"].item() == pytest.approx(plain_distance(features, local, 0.5).mean().item(), rel=1e-4)
    assert terms_with["loss_local"] > terms_without["loss_local"]


def test_beta_weights_tie_loss_and_by_default_also_the_attention_cosine(images):
    detector = make_detector(beta_global=0.5)
    features = loss_inputs(detector, images)
    terms = detector.loss_terms(features, images)
    with torch.no_grad():
        _, global_support = detector.model.frn(features).split(384, dim=1)
        autoencoder = detector.model.autoencoder(images)
        target = attention_pool(features, features)
        attended = attention_pool(autoencoder, features)
    assert terms["loss_tie"].item() == pytest.approx(
        plain_distance(autoencoder, global_support, 0.5).mean().item(), rel=1e-4)
    # lambda_attn_cos=None reproduces the official code: the attention loss's cosine weight is beta (spec §8.1)
    assert terms["loss_global"].item() == pytest.approx(plain_distance(target, attended, 0.5).mean().item(), rel=1e-4)

    beta_zero = make_detector(beta_global=0.0)
    beta_zero.load_state_dict(detector.state_dict())
    terms_zero = beta_zero.loss_terms(features, images)
    assert terms_zero["loss_tie"].item() == pytest.approx(((autoencoder - global_support) ** 2).mean().item(), rel=1e-4)
    assert terms_zero["loss_global"].item() == pytest.approx(((target - attended) ** 2).mean().item(), rel=1e-4)

    separate = make_detector(beta_global=0.0, lambda_attn_cos=0.5)
    separate.load_state_dict(detector.state_dict())
    terms_separate = separate.loss_terms(features, images)
    assert terms_separate["loss_global"].item() == pytest.approx(terms["loss_global"].item(), rel=1e-4)
    assert terms_separate["loss_tie"].item() == pytest.approx(terms_zero["loss_tie"].item(), rel=1e-4)


def test_feature_distance_variant_replaces_attention_loss(images):
    detector = make_detector(use_attention_loss=False)
    features = loss_inputs(detector, images)
    terms = detector.loss_terms(features, images)
    with torch.no_grad():
        autoencoder = detector.model.autoencoder(images)
    assert terms["loss_global"].item() == pytest.approx(plain_distance(features, autoencoder, 0.5).mean().item(),
                                                        rel=1e-4)


def test_tie_loss_off_drops_the_term_and_uses_attention_map(images):
    detector = make_detector(use_tie_loss=False)
    features = loss_inputs(detector, images)
    assert set(detector.loss_terms(features, images)) == {"loss_local", "loss_global"}
    detector.eval()
    with torch.no_grad():
        _, global_map = detector.model.raw_maps(images)
        with_tie = make_detector()
        with_tie.load_state_dict(detector.state_dict())
        with_tie.eval()
        _, tie_map = with_tie.model.raw_maps(images)
    assert not torch.allclose(global_map, tie_map)


def test_each_loss_term_is_finite_and_decreases_over_a_few_steps(images):
    detector = make_detector()
    features = loss_inputs(detector, images)
    optimizer = torch.optim.Adam([p for p in detector.model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(12):
        terms = detector.loss_terms(features, images)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        history.append({k: v.item() for k, v in terms.items()})
    for name in ("loss_local", "loss_global", "loss_tie"):
        values = [h[name] for h in history]
        assert all(torch.isfinite(torch.tensor(values))), name
        assert min(values[-3:]) < values[0], f"{name} did not decrease: {values}"


def test_calibration_maps_quantiles_to_zero_and_point_one(images):
    detector = make_detector()
    detector.eval()
    with torch.no_grad():
        local_map, global_map = detector.model.raw_maps(images)
    detector.fit_calibration({"local": local_map.flatten(1), "global": global_map.flatten(1)}, training_batches=[])
    q = detector.model.map_quantiles
    assert torch.allclose(q[0], torch.quantile(local_map.flatten(), 0.9))
    assert torch.allclose(q[3], torch.quantile(global_map.flatten(), 0.995))
    # The model's map is 0.5·(0.1·(L − q0)/(q1 − q0)) + 0.5·(0.1·(G − q2)/(q3 − q2)), written out here.
    with torch.no_grad():
        fused = detector.model(images).anomaly_map
    expected = 0.5 * 0.1 * (local_map - q[0]) / (q[1] - q[0]) + 0.5 * 0.1 * (global_map - q[2]) / (q[3] - q[2])
    assert torch.allclose(fused, expected, atol=1e-6)


def test_fitted_statistics_are_in_the_state_dict():
    detector = make_detector()
    detector.model.map_quantiles.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state = detector.state_dict()
    assert torch.equal(state["model.map_quantiles"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(state["model.feature_std"].flatten(), torch.ones(384))
    fresh = make_detector()
    fresh.model.feature_std.zero_()
    fresh.load_state_dict(state)
    assert fresh.model.feature_statistics_fitted and torch.equal(fresh.model.map_quantiles, detector.model.map_quantiles)


# ---------------------------------------------------------------------------------------------- local branch only
def test_local_only_model_has_no_global_branch_and_an_frn_sized_for_the_local_output(images):
    """Table 3 rows 1 and 6: no autoencoder at all, the FRN's last layer outputs C channels (not 2C)."""
    full, local_only = make_detector(), make_detector(global_branch=False)
    assert not any(key.startswith("model.autoencoder.") for key in local_only.state_dict())
    assert local_only.model.frn.decoder[-1][0].out_channels == 384
    assert full.model.frn.decoder[-1][0].out_channels == 768
    removed = sum(p.numel() for p in full.model.autoencoder.parameters())
    last_full, last_local = full.model.frn.decoder[-1], local_only.model.frn.decoder[-1]
    removed += sum(p.numel() for p in last_full.parameters()) - sum(p.numel() for p in last_local.parameters())
    trained = [sum(p.numel() for p in d.model.parameters() if p.requires_grad) for d in (full, local_only)]
    assert trained[0] - trained[1] == removed
    with torch.no_grad():
        assert local_only.model.frn(loss_inputs(local_only, images)).shape[1] == 384


def test_local_only_loss_is_the_local_distance_alone(images):
    detector = make_detector(global_branch=False, alpha_local=0.5)
    features = loss_inputs(detector, images)
    terms = detector.loss_terms(features, images)
    assert set(terms) == {"loss_local"}
    with torch.no_grad():
        local = detector.model.frn(features)
    assert terms["loss_local"].item() == pytest.approx(plain_distance(features, local, 0.5).mean().item(), rel=1e-4)


def test_local_only_map_is_the_normalised_local_map(images):
    detector = make_detector(global_branch=False, alpha_local=0.0)
    detector.eval()
    with torch.no_grad():
        local_map, global_map = detector.model.raw_maps(images)
    assert global_map is None
    detector.fit_calibration({"local": local_map.flatten(1)}, training_batches=[])
    q = detector.model.map_quantiles
    assert torch.allclose(q[0], torch.quantile(local_map.flatten(), 0.9))
    assert detector.model.statistics_fitted()
    with torch.no_grad():
        output = detector.model(images)
        features = detector.model.standardize(detector.model.extract_features(images))
        distance = ((features - detector.model.frn(features)) ** 2).mean(1, keepdim=True)  # α = 0: plain L2
    upsampled = F.interpolate(distance, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.allclose(local_map, detector.model._blur(upsampled), atol=1e-5)
    assert torch.allclose(output.anomaly_map, 0.1 * (local_map - q[0]) / (q[1] - q[0]), atol=1e-6)
    assert torch.allclose(output.image_score, output.anomaly_map.amax(dim=(-3, -2, -1)))
