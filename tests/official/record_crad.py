"""Record the official CRAD's outputs on fixed images, for ``tests/test_crad_official.py``.

The official code (github.com/tae-mo/CRAD at OFFICIAL_COMMIT) is not copied into this repository: pass a
checkout of it (``git clone`` or the search tool's ``fetch``) and this script writes ``crad_b5a1c47.pt`` beside
itself. It builds the official pipeline as ``models/model_helper.py`` chains it (the vendored lukemelas
EfficientNet-b4 with blocks 9 and 21 out, the MFCN neck, the CRAD reconstruction) in float64 on the CPU, with the
weights of ``official_weights.pipeline_seeded_weights`` (a function of each parameter's official name and shape
only, so the test gives our network the same numbers) and the backbone's BatchNorm statistics calibrated on a few
images (``official_backbone``; stored, float32-rounded). It runs it in eval mode on fixed images normalised as the
official dataset does and records every intermediate and the official evaluator's map and image score, then makes
one training step (coordinate noise off, so the step is deterministic) with the official loss, clipping and AdamW
groups and records the loss, the gradients and the updated weights' fingerprints. It also records the official
parameter counts of CRAD and CRAD-S at the paper's 224 px.

    pip install tabulate scikit-learn   # the official evaluator's imports, not this project's dependencies
    python tests/official/record_crad.py /path/to/CRAD
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
from official_weights import CRAD_FIXTURE_SETTINGS as S
from official_weights import fingerprint, fixed_images, pipeline_seeded_weights

OFFICIAL_COMMIT = "b5a1c47"
INTERMEDIATE_PICKS = 4096  # entries kept of each large intermediate (plus its sum and sum of squares)


def reconstruction_kwargs(image_size: int, blocks: int, expansion: int, noise_std: float) -> dict:
    """experiments/config.yaml's reconstruction entry, with what utils/misc_helper.update_config adds."""
    size = image_size // 8
    return {"layers": blocks, "inplanes": [216], "instrides": [8], "feature_size": [size, size], "save_recon": None,
            "local_resol": 8, "global_resol": 4, "ch_exp": expansion, "mse_lamb": 0.3, "cos_lamb": 0.7,
            "mse_coef": S["gate_scale"], "noise_std": noise_std}


def build_official(code: Path, noise_std: float) -> torch.nn.Sequential:
    sys.path.insert(0, str(code))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official evaluator puts its maps on CUDA
    # the official checkout's own packages (on sys.path above), not dependencies of this project
    backbones = importlib.import_module("models.backbones")
    necks = importlib.import_module("models.necks")
    reconstructions = importlib.import_module("models.reconstructions")
    backbone = backbones.efficientnet_b4(pretrained=False, outblocks=[9, 21], outstrides=[8, 16])
    neck = necks.MFCN(inplanes=[56, 160], outplanes=[216], instrides=[8, 16], outstrides=[8])
    reconstruction = reconstructions.CRAD(**reconstruction_kwargs(S["image_size"], S["blocks"], S["expansion"],
                                                                  noise_std))
    return torch.nn.ModuleDict({"backbone": backbone, "neck": neck, "reconstruction": reconstruction}).double()


def run(model: torch.nn.ModuleDict, images: torch.Tensor) -> dict:
    """ModelHelper.forward: each submodule's outputs added to one dict."""
    state = {"image": normalise(images)}
    for module in model.values():
        state.update(module(state))
    return state


def main(code: Path) -> None:
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip()
    if commit and not OFFICIAL_COMMIT.startswith(commit[:7]):
        raise SystemExit(f"{code} is at {commit}, not the official commit {OFFICIAL_COMMIT}")
    model = build_official(code, noise_std=0.05)
    weights = pipeline_seeded_weights(model.state_dict())
    model.load_state_dict(weights)
    statistics = calibrated_backbone_statistics(model, fixed_images())
    weights.update(statistics)
    model.load_state_dict(weights)
    images = fixed_images()
    reconstruction = model["reconstruction"]
    record: dict = {"commit": OFFICIAL_COMMIT, "settings": dict(S), "picks": INTERMEDIATE_PICKS,
                    "backbone_statistics": {name: value.float() for name, value in statistics.items()},
                    "shapes": {name: (tuple(v.shape), str(v.dtype)) for name, v in model.state_dict().items()},
                    "parameters": sum(p.numel() for p in reconstruction.parameters())}
    reconstructions = importlib.import_module("models.reconstructions")
    record["paper_parameters"] = {  # the reconstruction module at 224 px: CRAD (864) and CRAD-S (216)
        name: sum(p.numel() for p in reconstructions.CRAD(**reconstruction_kwargs(224, 11, expansion, 0.05)).parameters())
        for name, expansion in (("CRAD", 864), ("CRAD-S", 216))}

    seen = {}
    reconstruction.layer.register_forward_pre_hook(lambda module, args: seen.__setitem__("grids", args[0]))
    reconstruction.recover.register_forward_hook(lambda module, args, out: seen.__setitem__("recover", out))
    reconstruction.coord.register_forward_hook(lambda module, args, out: seen.__setitem__("local", out))
    reconstruction.coord_.register_forward_hook(lambda module, args, out: seen.__setitem__("global", out))
    model.eval()
    with torch.no_grad():
        out = run(model, images)
    evaluation = importlib.import_module("utils.eval_helper")
    preds = out["pred"].squeeze(1).numpy()
    maps = evaluation.EvalDataMeta(preds, None).preds  # the 21×21 box filter (count_include_pad)
    scores = evaluation.EvalImageMax.encode_pred(maps, [S["pool"], S["pool"]])
    eval_record = {"local_coordinates": seen["local"], "global_coordinates": seen["global"],
                   "image_scores": torch.from_numpy(scores)}
    large = {"stride8": out["features"][0], "stride16": out["features"][1], "features": out["feature_align"],
             "grids": seen["grids"], "reconstruction": seen["recover"], "refined": out["feature_rec"],
             "disparity": out["pred"], "anomaly_map": torch.from_numpy(maps)}
    eval_record.update({name: fingerprint(value, INTERMEDIATE_PICKS) for name, value in large.items()})
    record["eval"] = eval_record

    # One training step, deterministic: coordinate noise off (tools/train_val.py otherwise).
    model = build_official(code, noise_std=0.0)
    model.load_state_dict(weights)
    model.train()
    model["backbone"].eval()  # frozen_layers: [backbone]
    model["backbone"].requires_grad_(False)
    out = run(model, images)
    loss = torch.nn.functional.mse_loss(out["feature_rec"], out["feature_align"])  # FeatureMSELoss, weight 1
    params, query = [], []
    for name, p in model.named_parameters():  # train_val.py: name.split('.')[2] is 'query' under DDP's "module."
        (query if name.split(".")[1] == "query" else params).append(p)
    optimizer = torch.optim.AdamW([{"params": params, "lr": 0.001}, {"params": query, "lr": 0.1}])
    optimizer.zero_grad()
    loss.backward()
    gradients = {name: fingerprint(p.grad) for name, p in model["reconstruction"].named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    record["train_step"] = {"loss_mse": loss.detach().clone(),  # clone: mean() may view a whole buffer
                            "gradients": gradients,
                            "updated": {name: fingerprint(value) for name, value in
                                        model["reconstruction"].state_dict().items()}}
    path = HERE / f"crad_{OFFICIAL_COMMIT}.pt"
    torch.save(record, path)
    print(f"wrote {path}: {record['parameters']} parameters, paper sizes {record['paper_parameters']}, "
          f"loss {float(loss.detach()):.6f}, scores {scores}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
