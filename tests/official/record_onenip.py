"""Record the official OneNIP's outputs on fixed inputs, for ``tests/test_onenip_official.py``.

The official code (github.com/gaobb/OneNIP at OFFICIAL_COMMIT) is not copied into this repository: pass a checkout
of it (e.g. from ``git clone`` or the search tool's ``fetch``) and this script writes ``onenip_e93dec5.pt`` beside
itself. It builds the official ``OneNIP`` reconstruction module (models/reconstructions/onenip.py, with its
transformer, bidirectional decoder, refiner and neck-less input) in float64 on the CPU with the weights of
``official_weights.seeded_weights`` (a function of each parameter's official name and shape only, so the test
gives our network the same numbers), runs it in eval mode on fixed features and prompts, records its
intermediates, then makes one training step (dropout and jitter off, so the step is deterministic) with the
official losses, clipping and AdamW, and records the losses and the updated weights' fingerprints. Separately it
runs the official backbone and neck (the vendored lukemelas EfficientNet-b4, blocks 1/5/9/21 fused at stride 16 by
the MFCN neck) on the CRAD recording's fixed images with calibrated BatchNorm statistics (``official_backbone``)
and records the four levels and the fused features (fingerprints).

    python tests/official/record_onenip.py /path/to/OneNIP
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from official_backbone import calibrated_backbone_statistics, normalise
from official_weights import FIXTURE_SETTINGS as S
from official_weights import fingerprint, fixed_images, fixed_inputs, pipeline_seeded_weights, seeded_weights

OFFICIAL_COMMIT = "e93dec5"
FEATURE_PICKS = 4096  # entries kept of each backbone level and of the fused features (plus sum and sum of squares)


def record_backbone() -> dict:
    """configs/onenip_config.yaml's backbone (outlayers 1-4 → blocks 1, 5, 9, 21) and neck (stride 16), in eval
    mode on ``fixed_images`` (the official code must be on sys.path: ``build_official`` puts it there)."""
    backbones = importlib.import_module("models.backbones")
    necks = importlib.import_module("models.necks")
    model = torch.nn.ModuleDict({
        "backbone": backbones.efficientnet_b4(pretrained=False, outblocks=[1, 5, 9, 21], outstrides=[2, 4, 8, 16]),
        "neck": necks.MFCN(inplanes=[24, 32, 56, 160], outplanes=[272], instrides=[2, 4, 8, 16], outstrides=[16]),
    }).double()
    weights = pipeline_seeded_weights(model.state_dict())
    model.load_state_dict(weights)
    statistics = calibrated_backbone_statistics(model, fixed_images())
    model.load_state_dict({**weights, **statistics})
    model.eval()
    with torch.no_grad():
        state = {"image": normalise(fixed_images())}
        state.update(model["backbone"](state))
        fused = model["neck"](state)["query_feat"]
    return {"shapes": {name: (tuple(v.shape), str(v.dtype)) for name, v in model.state_dict().items()},
            "statistics": {name: value.float() for name, value in statistics.items()}, "picks": FEATURE_PICKS,
            "levels": [fingerprint(level, FEATURE_PICKS) for level in state["features"]],
            "features": fingerprint(fused, FEATURE_PICKS)}


def build_official(code: Path, dropout: float, jitter: bool) -> torch.nn.Module:
    sys.path.insert(0, str(code))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code puts its mask and noise on CUDA
    # the official checkout's own packages (on sys.path above), not dependencies of this project
    official = importlib.import_module("models.reconstructions.onenip")

    generate_mask = official.Transformer.generate_mask
    official.Transformer.generate_mask = lambda self, *a: generate_mask(self, *a).double()  # float64 throughout

    class Config(dict):
        __getattr__ = dict.get

    grid = S["grid"]
    return official.OneNIP(
        inplanes=[S["channels"]], instrides=[16], feature_size=[grid, grid],
        feature_jitter=Config(scale=20.0, prob=1.0) if jitter else None,
        neighbor_mask=Config(neighbor_size=[grid // 2, grid // 2], mask=[True, True, True]), hidden_dim=256,
        pos_embed_type="learned", save_recon=None, initializer={"method": "xavier_uniform"}, nhead=8,
        num_encoder_layers=S["layers"], num_decoder_layers=S["layers"], dim_feedforward=S["ffn_dim"],
        dropout=dropout, activation="relu", normalize_before=False).double()


def main(code: Path) -> None:
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    if commit and not OFFICIAL_COMMIT.startswith(commit[:7]):
        raise SystemExit(f"{code} is at {commit}, not the official commit {OFFICIAL_COMMIT}")
    model = build_official(code, dropout=0.1, jitter=True)
    weights = seeded_weights(model.state_dict())
    model.load_state_dict(weights)
    inputs = fixed_inputs()
    record: dict = {"commit": OFFICIAL_COMMIT, "settings": dict(S),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "shapes": {name: (tuple(v.shape), str(v.dtype)) for name, v in model.state_dict().items()}}
    steps = {}

    def keep(name):
        return lambda module, args, output: steps.__setitem__(name, output)

    model.transformer.encoder.register_forward_hook(keep("encoder"))
    model.transformer.decoder.register_forward_hook(keep("decoder"))
    model.eval()
    with torch.no_grad():
        out = model({"query_feat": inputs["query"], "prompt_feat": inputs["prompt"]})
    record["eval"] = {"encoder": steps["encoder"], "decoder": steps["decoder"], "reconstruction": out["rec_feat"],
                      "refiner_logits": out["ref_logit"], "reconstruction_map": out["rec_pred"]}

    # One training step, deterministic: no dropout, no jitter (the step's other randomness: none).
    DiceLoss = importlib.import_module("utils.criterion_helper").DiceLoss

    model = build_official(code, dropout=0.0, jitter=False)
    # The decoder's final attention hard-codes its dropout (0.1, whatever the config says): off for this step.
    model.transformer.decoder.final_attn_token_to_image.dropout = 0.0
    model.transformer.decoder.dropout.p = 0.0
    model.load_state_dict(weights)
    model.train()
    out = model({"query_feat": inputs["query"], "synthetic_feat": inputs["synthetic"], "prompt_feat": inputs["prompt"]})
    masks = torch.cat([torch.zeros_like(inputs["mask"]), inputs["mask"]])
    mse = torch.nn.functional.mse_loss(out["rec_feat"], out["target_feat"])
    dice = DiceLoss(weight=0.5)({"mask": masks, "ref_logit": out["ref_logit"]})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    optimizer.zero_grad()
    (mse + 0.5 * dice).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    record["train_step"] = {"loss_mse": mse.detach(), "loss_dice": dice.detach(),
                            "updated": {name: fingerprint(value) for name, value in model.state_dict().items()}}
    record["backbone"] = record_backbone()
    torch.save(record, HERE / f"onenip_{OFFICIAL_COMMIT}.pt")
    print(f"wrote {HERE / f'onenip_{OFFICIAL_COMMIT}.pt'}: {record['parameters']} parameters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
