"""OneNIP against the official code (gaobb/OneNIP at e93dec5), in float64, with the same weights and inputs.

``tests/official/onenip_e93dec5.pt`` was written by ``tests/official/record_onenip.py`` from the official
module; the weights are regenerated here from the official parameter names (``official_weights.seeded_weights``)
and renamed to ours. Compared: the encoder's tokens, the decoder's output, the reconstruction, the refiner's
logits, the reconstruction map and the fused map and score (the official fusion formula on the official
outputs), then one training step (losses, and every updated weight and BN statistic). The backbone and neck are
recorded apart (their features would not fit the small transformer): the official b4 and MFCN neck on fixed
images, compared with our feature extractor loading the same weights as a lukemelas-layout file through
``pretrained: file`` with ``backbone_padding: lukemelas``, as the paper configs do.
"""

from __future__ import annotations

import re
from pathlib import Path

import einops
import pytest
import torch
import torch.nn.functional as F

from networks.onenip import OneNIPModel, dice_loss, parameter_count
from tests.official.official_weights import FIXTURE_SETTINGS as S
from tests.official.official_weights import (
    fingerprint,
    fixed_images,
    fixed_inputs,
    regenerated_weights,
    save_backbone_file,
    seeded_weights,
)

RECORDING = Path(__file__).parent / "official" / "onenip_e93dec5.pt"
TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}  # float64 on both sides; the issue asks for ≤ 1e-5

_RENAMES = [
    (r"^pos_embed\.(row|col)_embed\.weight$", r"\1_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.\1.attention."),
    (r"^transformer\.encoder\.layers\.(\d+)\.", r"encoder.\1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn_prompt_to_image\.", r"decoder.\1.prompt_to_image."),
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn_image_to_prompt\.", r"decoder.\1.image_to_prompt."),
    (r"^transformer\.decoder\.layers\.(\d+)\.mlp\.lin(\d)\.", r"decoder.\1.linear\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.", r"decoder.\1."),
    (r"^transformer\.decoder\.final_attn_token_to_image\.", "final_attention."),
    (r"^transformer\.decoder\.norm\.", "decoder_norm."),
    (r"^seghead\.upconv(\d)\.(\d)\.", lambda m: f"refiner.blocks.{4 * (int(m[1]) - 1) + int(m[2])}."),
    (r"^seghead\.predictor\.", "refiner.predictor."),
]


def ours_name(official: str) -> str:
    for pattern, replacement in _RENAMES:
        renamed = re.sub(pattern, replacement, official)
        if renamed != official:
            return renamed
    return official  # input_proj, output_proj


@pytest.fixture(scope="module")
def recording():
    return torch.load(RECORDING)


def our_model(recording, dropout: float = 0.1, jitter: float = 20.0) -> OneNIPModel:
    """Our OneNIP at the recording's size, holding the official weights: a 16-channel backbone level stands in
    for the features (they are given, not computed)."""
    model = OneNIPModel(backbone="tf_efficientnet_lite0", layers=["blocks.0"], pretrained=False,
                        image_size=S["image_size"], ffn_dim=S["ffn_dim"], encoder_layers=S["layers"],
                        decoder_layers=S["layers"], dropout=dropout, jitter_scale=jitter).double()
    official = seeded_weights({name: torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
                               for name, (shape, dtype) in recording["shapes"].items()})
    renamed = {ours_name(name): value for name, value in official.items()}
    missing = model.load_state_dict(renamed, strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not missing.unexpected_keys, missing.unexpected_keys
    assert not trained & set(missing.missing_keys), sorted(trained & set(missing.missing_keys))
    return model


def test_parameter_count_equals_the_official_modules(recording):
    assert parameter_count(our_model(recording)) == recording["parameters"]


def test_backbone_levels_and_fused_features_equal_the_official_ones(recording, tmp_path):
    """Blocks 1/5/9/21 of the official b4 (strides 2-16, 24+32+56+160 channels) fused at stride 16, at 128 px."""
    official = recording["backbone"]
    weights_file = tmp_path / "efficientnet-b4-seeded.pth"
    save_backbone_file(regenerated_weights(official["shapes"], official["statistics"]), weights_file)
    model = OneNIPModel(backbone="tf_efficientnet_b4", layers=["blocks.0", "blocks.1", "blocks.2", "blocks.4"],
                        pretrained="file", weights_file=str(weights_file), backbone_padding="lukemelas",
                        image_size=128).double().eval()
    with torch.no_grad():
        levels = model.feature_extractor(fixed_images())
        features = model.extract_features(fixed_images())
    assert features.shape == (2, 272, 8, 8)
    for index, (ours, expected) in enumerate(zip(levels, official["levels"], strict=True)):
        torch.testing.assert_close(fingerprint(ours, official["picks"]), expected, **TOLERANCE,
                                   msg=lambda text, index=index: f"level {index}: {text}")
    torch.testing.assert_close(fingerprint(features, official["picks"]), official["features"], **TOLERANCE)


def test_eval_mode_intermediates_equal_the_official_ones(recording):
    model = our_model(recording).eval()
    inputs = fixed_inputs()
    official = recording["eval"]
    seen = {}
    model.encoder[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("encoder", out))
    model.decoder_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("decoder", out))
    with torch.no_grad():
        reconstruction = model.reconstruct(inputs["query"], inputs["prompt"])
        difference = reconstruction - inputs["query"]
        logits = model.refiner_logits(difference.abs())
        official_map = F.interpolate(difference.norm(dim=1, keepdim=True), size=(S["image_size"],) * 2,
                                     mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen["encoder"], einops.rearrange(official["encoder"], "n b d -> b n d"), **TOLERANCE)
    torch.testing.assert_close(seen["decoder"], einops.rearrange(official["decoder"], "n b d -> b n d"), **TOLERANCE)
    torch.testing.assert_close(reconstruction, official["reconstruction"], **TOLERANCE)
    torch.testing.assert_close(logits, official["refiner_logits"], **TOLERANCE)
    torch.testing.assert_close(official_map, official["reconstruction_map"], **TOLERANCE)

    # The fused map and score: tools/train_val.py's 0.5·A_rec + 0.5·((max + min)/2 of A_rec)·A_ref and the max of the
    # 16×16 (stride 1) window mean, on the official outputs; our fusion scale is that constant (fitted, not test-set).
    a_rec, a_ref = official["reconstruction_map"], torch.sigmoid(official["refiner_logits"])
    scale = (a_rec.max() + a_rec.min()) / 2
    model.fusion_scale.fill_(float(scale))
    expected_map = 0.5 * a_rec + 0.5 * scale * a_ref
    with torch.no_grad():
        output = model.maps_and_score(inputs["query"], reconstruction)
    torch.testing.assert_close(output.anomaly_map, expected_map, **TOLERANCE)
    torch.testing.assert_close(output.image_score, F.avg_pool2d(expected_map, 16, stride=1).flatten(1).amax(1),
                               **TOLERANCE)


def test_one_training_step_equals_the_official_one(recording):
    """Dropout and jitter off (as recorded), the paper's losses (MSE + 0.5·Dice), clipping 0.1 and AdamW(1e-4)."""
    model = our_model(recording, dropout=0.0, jitter=0.0).train()
    inputs = fixed_inputs()
    queries = torch.cat([inputs["query"], inputs["synthetic"]])
    targets = torch.cat([inputs["query"], inputs["query"]])
    reconstruction = model.reconstruct(queries, inputs["prompt"], jitter=True)
    mse = (reconstruction - targets).pow(2).mean()
    logits = model.refiner_logits((reconstruction - queries).abs())
    dice = dice_loss(logits, torch.cat([torch.zeros_like(inputs["mask"]), inputs["mask"]]))
    step = recording["train_step"]
    torch.testing.assert_close(mse.detach(), step["loss_mse"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dice.detach(), step["loss_dice"], rtol=1e-12, atol=1e-12)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    (mse + 0.5 * dice).backward()
    torch.nn.utils.clip_grad_norm_(parameters, 0.1)
    optimizer.step()
    state = model.state_dict()
    for official_name, expected in step["updated"].items():
        torch.testing.assert_close(fingerprint(state[ours_name(official_name)]), expected, rtol=1e-9, atol=1e-9,
                                   msg=lambda text, name=official_name: f"{name}: {text}")
