"""OneNIP (spec ../shared/specs/onenip.md): shapes, the neighbour mask, the Dice loss, the prompt modes,
the prompt pool and its selection, the fusion fitted on held-out normal images, and the training loss."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.onenip import OneNIP
from networks.onenip import (
    EncoderLayer,
    OneNIPModel,
    dice_loss,
    fuse_to_stride,
    jitter_features,
    neighbour_mask,
    parameter_count,
    window_mean,
)

SIZE = 64  # a 4×4 token grid


SMALL = {"backbone": "tf_efficientnet_lite0", "pretrained": False, "image_size": SIZE, "hidden_dim": 32, "heads": 4,
         "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2}


def small_model(**overrides) -> OneNIPModel:
    torch.manual_seed(0)
    return OneNIPModel(**{**SMALL, **overrides})


def small_detector(**overrides) -> OneNIP:
    torch.manual_seed(0)
    return OneNIP(**{**SMALL, **overrides})


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def training_batch(count: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, 1, SIZE, SIZE)
    masks[:, :, 10:30, 20:40] = 1
    return {"image": torch.rand(count, 3, SIZE, SIZE, generator=generator),
            "synthetic_image": torch.rand(count, 3, SIZE, SIZE, generator=generator), "synthetic_mask": masks,
            "prompt_image": torch.rand(count, 3, SIZE, SIZE, generator=generator),
            "index": torch.arange(count), "prompt_index": torch.arange(100, 100 + count),
            "label": torch.zeros(count, dtype=torch.long),
            "category": ["first", "second"] * (count // 2)}


# ----------------------------------------------------------------------------------------------- shapes
def test_paper_sizes_b4_gives_272_channels_at_14x14_and_8_37m_parameters():
    """Spec §1/§4: b4 blocks of strides 2/4/8/16 (24+32+56+160 = 272 channels), 14×14 tokens at 224 px, a 7×7
    window, and ≈ 8.37 M trainable parameters (projections 0.14 M, encoder 4×0.79 M, decoder 4×1.05 M, final
    attention 0.26 M, refiner 0.59 M)."""
    model = OneNIPModel(backbone="tf_efficientnet_b4", pretrained=False, image_size=224)
    assert model.feature_extractor.channels == [24, 32, 56, 160] and model.channels == 272
    assert model.feature_extractor.reductions == [2, 4, 8, 16]
    assert model.grid == 14 and model.neighbour_window == 7
    assert parameter_count(model) == pytest.approx(8.37e6, abs=0.01e6)
    assert sum(p.numel() for p in model.encoder[0].parameters()) == pytest.approx(0.79e6, abs=0.005e6)
    assert sum(p.numel() for p in model.decoder[0].parameters()) == pytest.approx(1.05e6, abs=0.005e6)
    assert sum(p.numel() for p in model.refiner.parameters()) == pytest.approx(0.59e6, abs=0.005e6)


def test_shapes_through_encoder_decoder_and_refiner():
    model = small_model().eval()
    features = model.extract_features(images(3, 1))
    assert features.shape == (3, 192, 4, 4) and features.dtype == torch.float32
    reconstruction = model.reconstruct(features, features[:1].expand(3, -1, -1, -1))
    assert reconstruction.shape == features.shape
    logits = model.refiner_logits((reconstruction - features).abs())
    assert logits.shape == (3, 1, SIZE, SIZE)
    # training: [normal | synthetic] (2B queries) share the B prompts
    training = model.train().reconstruct(torch.cat([features, features]), features, jitter=True)
    assert training.shape == (6, 192, 4, 4)


def test_fuse_to_stride_is_bilinear_with_align_corners_true():
    coarse = torch.arange(16.0).view(1, 1, 4, 4)
    fine = torch.arange(64.0).view(1, 1, 8, 8)
    fused = fuse_to_stride([fine, coarse], (4, 4))
    assert fused.shape == (1, 2, 4, 4)
    assert torch.equal(fused[0, 1], coarse[0, 0])
    # align_corners=True maps the corners onto corners: fine pixel (0,0), (0,7), (7,0), (7,7)
    assert fused[0, 0, 0, 0] == 0 and fused[0, 0, 0, 3] == 7 and fused[0, 0, 3, 0] == 56 and fused[0, 0, 3, 3] == 63


# ----------------------------------------------------------------------------------------------- neighbour mask
def test_the_neighbour_mask_hides_exactly_each_tokens_window():
    grid, window = 14, 7
    allowed = neighbour_mask(grid, grid, window)
    assert allowed.shape == (196, 196)
    for i in range(196):
        for j in range(196):
            inside = abs(i // grid - j // grid) <= 3 and abs(i % grid - j % grid) <= 3
            assert bool(allowed[i, j]) == (not inside)
    assert int((~allowed[0]).sum()) == 16 and int((~allowed[7 * 14 + 7]).sum()) == 49  # corner 4×4, centre 7×7
    # 256 px: k = 16 // 2 = 8, r = 4, so the effective window is 9×9 (spec surprise 9)
    assert int((~neighbour_mask(16, 16, 8)[8 * 16 + 8]).sum()) == 81


def test_a_masked_token_cannot_see_its_window():
    """One encoder layer: changing tokens inside token i's window (other than i) leaves its output unchanged;
    changing one outside changes it."""
    torch.manual_seed(0)
    layer = EncoderLayer(16, 2, 32, dropout=0.0).eval()
    grid = 6
    allowed = neighbour_mask(grid, grid, 3)  # r = 1: the 3×3 block around each token
    pos = torch.zeros(1, grid * grid, 16)
    tokens = torch.randn(1, grid * grid, 16)
    i = 2 * grid + 2
    inside, outside = 1 * grid + 1, 5 * grid + 5
    base = layer(tokens, pos, allowed)[0, i]
    changed_inside, changed_outside = tokens.clone(), tokens.clone()
    changed_inside[0, inside] += 5.0
    changed_outside[0, outside] += 5.0
    torch.testing.assert_close(layer(changed_inside, pos, allowed)[0, i], base)
    assert (layer(changed_outside, pos, allowed)[0, i] - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- losses and jitter
def test_the_dice_loss_equals_the_hand_computed_value():
    """1 − (Σpg + 1)/(Σp² + Σg² + 1) per sample, no factor 2 (spec §7). p = (0.5, 0.5) on g = (1, 0):
    1 − 1.5/2.5 = 0.4; p = (0.75, 0.25) on an empty mask: 1 − 1/1.625."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]]).view(2, 1, 1, 2)
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    expected = (0.4 + (1 - 1 / 1.625)) / 2
    assert float(dice_loss(logits, masks)) == pytest.approx(expected, rel=1e-6)
    # a perfect, confident prediction tends to 0.5, not 0 (the missing factor 2)
    perfect = dice_loss(torch.tensor([[1e4, -1e4] * 50]).view(1, 1, 1, 100), torch.tensor([[1.0, 0.0] * 50]).view(1, 1, 1, 100))
    assert float(perfect) == pytest.approx(1 - 51 / 101, rel=1e-6)


def test_feature_jitter_follows_the_formula():
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    jittered = jitter_features(tokens, 20.0)
    torch.manual_seed(3)
    noise = torch.randn_like(tokens)
    torch.testing.assert_close(jittered, tokens + noise * 20.0 * tokens.norm(dim=-1, keepdim=True) / 8)


def test_jitter_is_applied_in_training_only_when_asked():
    model = small_model(dropout=0.0)
    features = model.extract_features(images(2, 2))
    with torch.no_grad():
        plain = model.reconstruct(features, features, jitter=False)
        again = model.reconstruct(features, features, jitter=False)
        torch.manual_seed(1)
        jittered = model.reconstruct(features, features, jitter=True)
    assert torch.equal(plain, again) and not torch.allclose(plain, jittered)


def test_the_training_loss_has_both_terms_and_goes_down():
    detector = small_detector(jitter_scale=0.0, dropout=0.0)  # the optimisation alone, without its noise
    batch = training_batch()
    detector.model.set_prompt_pool(detector.model.extract_features(batch["image"][:2]), torch.tensor([0, 1]),
                                   ["first", "second"])
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    detector.train()
    for _ in range(45):
        terms = detector.loss_terms(batch)
        assert set(terms) == {"loss_mse", "loss_dice"}
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append({name: float(value) for name, value in terms.items()})
    assert losses[-1]["loss_mse"] < 0.5 * losses[0]["loss_mse"]
    assert losses[-1]["loss_dice"] < 0.9 * losses[0]["loss_dice"]


def test_the_refiner_gradient_reaches_the_transformer():
    """Spec surprise 10: |r − F| is not detached, so the Dice loss alone trains the transformer."""
    detector = small_detector(restoration=False)
    batch = training_batch()
    detector.model.set_prompt_pool(detector.model.extract_features(batch["image"][:2]), torch.tensor([0, 1]),
                                   ["first", "second"])
    detector.train()
    detector.loss_terms(batch)["loss_dice"].backward()
    assert detector.model.output_proj.weight.grad.abs().sum() > 0
    assert detector.model.encoder[0].linear1.weight.grad.abs().sum() > 0


def test_restoration_off_regresses_only_the_clean_images():
    batch = training_batch()
    on, off = small_detector(dropout=0.0, jitter_scale=0.0), small_detector(dropout=0.0, jitter_scale=0.0, restoration=False)
    off.load_state_dict(on.state_dict())
    for detector in (on, off):
        detector.model.set_prompt_pool(detector.model.extract_features(batch["image"][:2]), torch.tensor([0, 1]),
                                       ["first", "second"])
    with torch.no_grad():
        clean = on.model.extract_features(batch["image"])
        synthetic = on.model.extract_features(batch["synthetic_image"])
        prompts = on.model.extract_features(batch["prompt_image"])
        reconstruction = on.model.reconstruct(torch.cat([clean, synthetic]), prompts)
        squared = (reconstruction - torch.cat([clean, clean])).pow(2)
        assert float(on.loss_terms(batch)["loss_mse"]) == pytest.approx(float(squared.mean()), rel=1e-5)
        assert float(off.loss_terms(batch)["loss_mse"]) == pytest.approx(float(squared[:4].mean()), rel=1e-5)


# ----------------------------------------------------------------------------------------------- prompt modes
def test_prompt_modes_change_the_decoders_query_stream_as_intended():
    batch, other = training_batch(seed=0), training_batch(seed=1)
    for key in ("index", "image", "synthetic_image"):  # same queries, other random prompts
        other[key] = batch[key]

    dynamic = small_detector(dropout=0.0, jitter_scale=0.0, cache_features=False)
    static = small_detector(dropout=0.0, jitter_scale=0.0, cache_features=False, prompt="static")
    static.load_state_dict(dynamic.state_dict(), strict=False)
    for detector in (dynamic, static):
        pool = detector.model.extract_features(images(2, 9))
        detector.model.set_prompt_pool(pool, torch.tensor([0, 1]), ["first", "second"])
    with torch.no_grad():
        # dynamic: the prompts are the batch's random prompt images, so other prompts give another reconstruction
        torch.testing.assert_close(dynamic.training_prompts(batch), dynamic.model.extract_features(batch["prompt_image"]))
        assert not torch.allclose(dynamic.loss_terms(batch)["loss_mse"], dynamic.loss_terms(other)["loss_mse"])
        # static: each image's category's pool prompt, whatever prompt image the loader drew
        expected = static.model.prompt_features[torch.tensor([0, 1, 0, 1])]
        assert torch.equal(static.training_prompts(batch), expected)
        assert torch.equal(static.training_prompts(other), expected)
        torch.testing.assert_close(static.loss_terms(batch)["loss_mse"], static.loss_terms(other)["loss_mse"])

    # none: learned queries start the decoder; no prompt is read, and the queries matter
    none = small_model(prompt="none", dropout=0.0).eval()
    assert none.prompt_pool_fitted() and none.query_embed is not None
    features = none.extract_features(images(2, 3))
    with torch.no_grad():
        first = none.reconstruct(features, None)
        none.query_embed.add_(1.0)
        assert not torch.allclose(first, none.reconstruct(features, None))
    # with a prompt, the reconstruction is read off the PROMPT stream: another prompt, another reconstruction
    guided = small_model(dropout=0.0).eval()
    features = guided.extract_features(images(2, 3))
    with torch.no_grad():
        a = guided.reconstruct(features, guided.extract_features(images(2, 4)))
        b = guided.reconstruct(features, guided.extract_features(images(2, 5)))
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------- the prompt pool
def _category_batches(count_per_category: int = 6) -> list[dict]:
    """Two visually distinct categories: dark noisy images and bright striped ones."""
    generator = torch.Generator().manual_seed(0)
    dark = torch.rand(count_per_category, 3, SIZE, SIZE, generator=generator) * 0.3
    bright = 0.7 + 0.3 * torch.rand(count_per_category, 3, SIZE, SIZE, generator=generator)
    bright[:, :, ::8] = 0.0
    both = torch.cat([dark, bright])
    categories = ["dark"] * count_per_category + ["bright"] * count_per_category
    return [{"image": both[i:i + 4], "index": torch.arange(i, i + 4), "label": torch.zeros(4, dtype=torch.long),
             "category": categories[i:i + 4]} for i in range(0, len(both), 4)]


def test_the_pool_caches_features_equal_to_freshly_computed_ones():
    detector = small_detector(prompts_per_category=2)
    batches = _category_batches()
    detector.fit_training_statistics(batches)
    model = detector.model
    assert model.category_names == ["bright", "dark"]
    assert model.prompt_category.tolist() == [0, 0, 1, 1] and model.prompt_features.shape == (4, 192, 4, 4)
    everything = torch.cat([b["image"] for b in batches])
    fresh = model.extract_features(everything)
    # each pool entry IS one training image's features (to float rounding: the batches differ in size)
    matches = [[bool(torch.allclose(pool, one, rtol=1e-5, atol=1e-5)) for one in fresh] for pool in model.prompt_features]
    assert all(sum(row) == 1 for row in matches)
    chosen = [row.index(True) for row in matches]
    assert all((index >= 6) == (category == 0) for index, category in zip(chosen, model.prompt_category.tolist()))
    # the training cache gives the same features as a fresh backbone pass
    cached = detector.feature_cache(torch.tensor([3, 7]), everything[[3, 7]], model.extract_features)
    torch.testing.assert_close(cached, fresh[[3, 7]])
    torch.testing.assert_close(detector.feature_cache(torch.tensor([3, 7]), torch.zeros(2, 3, SIZE, SIZE),
                                                      model.extract_features), fresh[[3, 7]])


def test_selection_by_similarity_and_by_label():
    detector = small_detector(prompts_per_category=2)
    batches = _category_batches()
    detector.fit_training_statistics(batches)
    model = detector.model.eval()
    queries = torch.cat([b["image"] for b in batches])
    truth = torch.tensor([1] * 6 + [0] * 6)
    features = model.extract_features(queries)
    chosen = model.select_prompts(features)
    assert torch.equal(model.prompt_category[chosen], truth)
    # by hand: cosine of input_proj(mean token)
    pooled = torch.nn.functional.normalize(model.input_proj(features.mean(dim=(2, 3))), dim=1)
    pool = torch.nn.functional.normalize(model.input_proj(model.prompt_features.mean(dim=(2, 3))), dim=1)
    assert torch.equal(chosen, (pooled @ pool.T).argmax(dim=1))

    labelled = small_detector(prompts_per_category=2, prompt_selection="label")
    labelled.load_state_dict(detector.state_dict())
    assert labelled.model.input_fields == ("category_index",)
    wrong = 1 - truth  # label selection obeys the label, even a wrong one
    chosen = labelled.model.select_prompts(features, wrong)
    assert torch.equal(labelled.model.prompt_category[chosen], wrong)
    assert labelled.model_inputs({"category": ["dark", "bright"]})["category_index"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="no category \\['cable'\\]"):
        labelled.model_inputs({"category": ["cable"]})


def test_the_fusion_scale_is_fitted_on_validation_images_only():
    detector = small_detector()
    batches = _category_batches()
    detector.fit_training_statistics(batches)
    validation = _category_batches(4)
    detector.calibrate(validation, batches)
    model = detector.model.eval()
    highs, lows = [], []
    with torch.no_grad():
        for batch in validation:
            high, low = model.reconstruction_map_range(*model.run(batch["image"])[:2])
            highs.append(high)
            lows.append(low)
        expected = (torch.cat(highs).max() + torch.cat(lows).min()) / 2
        assert float(model.fusion_scale) == pytest.approx(float(expected), rel=1e-5)
        # the map is 0.5·A_rec + 0.5·scale·sigmoid(refiner), and the score the max of its 16×16 means
        features, reconstruction, _ = model.run(validation[0]["image"])
        difference = reconstruction - features
        a_rec = torch.nn.functional.interpolate(difference.norm(dim=1, keepdim=True), size=(SIZE, SIZE),
                                                mode="bilinear", align_corners=True)
        refined = torch.sigmoid(model.refiner_logits(difference.abs()))
        expected_map = 0.5 * a_rec + 0.5 * model.fusion_scale * refined
        output = model(validation[0]["image"])
        torch.testing.assert_close(output.anomaly_map, expected_map)
        torch.testing.assert_close(output.image_score,
                                   torch.nn.functional.avg_pool2d(expected_map, 16, stride=1).flatten(1).amax(1))
    assert detector.is_calibrated()


def test_bad_settings_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="prompt must be one of"):
        small_model(prompt="fixed")
    with pytest.raises(ValueError, match="prompt_selection must be one of"):
        small_model(prompt_selection="nearest")
    with pytest.raises(ValueError, match="multiple of 16"):
        small_model(image_size=100)


def test_the_official_b4_weights_file_gives_the_official_blocks_1_5_9_21(tmp_path):
    """Spec §1: the official features are the outputs of MBConv blocks 1, 5, 9 and 21 of lukemelas' b4, fused at
    stride 16 with align_corners=True. A lukemelas-layout file named as the official one loads through the
    converter and gives exactly those (random weights with non-trivial BN statistics; 64 px, where the port's
    static padding equals timm's dynamic one)."""
    from tests.test_lukemelas_weights import reference_network

    reference = reference_network("b4", seed=2)
    path = tmp_path / "efficientnet-b4-6ed6700e.pth"
    torch.save(reference.state_dict(), path)
    model = OneNIPModel(backbone="tf_efficientnet_b4", weights_file=str(path), image_size=SIZE)
    assert "lukemelas" in model.weights_source
    outputs = {}
    for block in (1, 5, 9, 21):
        reference._blocks[block].register_forward_hook(lambda m, i, o, block=block: outputs.__setitem__(block, o))
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference((images - mean) / std)
        expected = fuse_to_stride([outputs[b] for b in (1, 5, 9, 21)], (SIZE // 16, SIZE // 16))
        actual = model.extract_features(images)
    assert actual.shape == (2, 272, 4, 4)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_similarity_picks_a_prompt_of_the_right_category_on_the_embedded_test_set(embedded_root):
    """The pool is built from the training images; each test image (normal or anomalous) picks its prompt by cosine
    similarity of pooled projected tokens. With the real ImageNet Lite0 and the projection as initialised (before
    any training) the chosen prompt has the image's own category for ≥ 95% of the test images."""
    from datamodules.datamodule import AnomalyDataModule

    datamodule = AnomalyDataModule(layout="embedded", root=str(embedded_root), image_size=128)
    torch.manual_seed(0)
    detector = OneNIP(backbone="tf_efficientnet_lite0", pretrained=True, image_size=128).eval()
    detector.fit_training_statistics(datamodule.statistics_dataloader())
    model = detector.model
    hits = []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            chosen = model.select_prompts(model.extract_features(batch["image"]))
            hits.append(model.prompt_category[chosen] == detector.category_indices(batch["category"]))
    accuracy = float(torch.cat(hits).float().mean())
    print(f"prompt category accuracy {accuracy:.3f}")
    assert torch.cat(hits).numel() == 100 and accuracy >= 0.95  # measured 1.00


def test_the_separable_window_mean_equals_avg_pool():
    maps = torch.rand(3, 1, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
    expected = torch.nn.functional.avg_pool2d(maps, 16, stride=1)
    torch.testing.assert_close(window_mean(maps, 16), expected, rtol=1e-5, atol=1e-5)
    assert window_mean(maps, 16).shape == (3, 1, 209, 209)
