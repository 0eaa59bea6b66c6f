"""OneNIP's reconstruction in eval mode against dropout mode, ours and the official code's, on the same features.

Issue 19 asked whether OneNIP's inert eval-mode reconstruction (worse than predicting zeros) is a port defect or
the recipe. This trains the transformer and refiner on cached frozen features of the embedded quickstart
(Lite0, 128 px, the quickstart's batches: clean, synthetic and prompt images), with the paper's losses, AdamW,
clipping 0.1 and bf16 autocast, and prints the reconstruction MSE of 64 clean training images in eval mode
and with dropout on, every --every steps. ``--impl official`` trains the official ``OneNIP`` module instead
(gaobb/OneNIP at e93dec5: pass its checkout with --official-code; fetch it, it is not copied here).

    python bench/onenip_reconstruction.py --lr 1e-3                      # the old quickstart rate: eval mode collapses
    python bench/onenip_reconstruction.py --lr 1e-3 --impl official --official-code /path/to/OneNIP
    python bench/onenip_reconstruction.py --lr 3e-4                      # the shipped quickstart rate

The features are computed once into --cache (≈ 0.3 GB; 6 epochs of synthetic anomalies, cycled).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.cli import AnomalyCLI  # noqa: E402
from networks.onenip import OneNIPModel, dice_loss  # noqa: E402


def cached_features(cache: Path, epochs: int) -> dict:
    if cache.is_file():
        return torch.load(cache)
    cli = AnomalyCLI(program="bench", args=["--config", str(REPO / "configs/onenip/quickstart.yaml"),
                                            "--wandb.mode=disabled", "--trainer.logger=false",
                                            f"--run.dir={cache.parent / 'bench_run'}", "--run.resume=false"])
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    cli.datamodule.request_training_fields(("prompt_image",))
    extract = cli.model.model.extract_features
    batches = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(epochs):
            for b in cli.datamodule.train_dataloader():
                batches.append({"clean": extract(b["image"]), "synthetic": extract(b["synthetic_image"]),
                                "prompt": extract(b["prompt_image"]), "mask": b["synthetic_mask"]})
        held = torch.cat([extract(b["image"]) for b in cli.datamodule.statistics_dataloader()])
    data = {"batches": batches, "train_eval": held}
    torch.save(data, cache)
    return data


class OfficialAdapter(torch.nn.Module):
    """The official module behind our ``reconstruct`` / ``refiner_logits`` calls."""

    def __init__(self, code: Path, channels: int, grid: int, jitter: float, dropout: float) -> None:
        super().__init__()
        sys.path.insert(0, str(code))
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code moves masks and noise to CUDA
        # the official checkout's own package (on sys.path above), not a dependency of this project
        Official = importlib.import_module("models.reconstructions.onenip").OneNIP

        class Config(dict):
            __getattr__ = dict.get

        self.official = Official(
            inplanes=[channels], instrides=[16], feature_size=[grid, grid],
            feature_jitter=Config(scale=jitter, prob=1.0) if jitter else None,
            neighbor_mask=Config(neighbor_size=[grid // 2, grid // 2], mask=[True, True, True]), hidden_dim=256,
            pos_embed_type="learned", save_recon=None, initializer={"method": "xavier_uniform"}, nhead=8,
            num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=1024, dropout=dropout, activation="relu",
            normalize_before=False)
        self._logits = None

    def reconstruct(self, features, prompts, jitter=False):
        if self.training:
            half = features.shape[0] // 2
            out = self.official({"query_feat": features[:half], "synthetic_feat": features[half:],
                                 "prompt_feat": prompts})
        else:
            out = self.official({"query_feat": features, "prompt_feat": prompts})
        self._logits = out["ref_logit"]
        return out["rec_feat"].float()

    def refiner_logits(self, difference):
        return self._logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("ours", "official"), default="ours")
    parser.add_argument("--official-code", type=Path, default=None, help="a checkout of gaobb/OneNIP (e93dec5)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=540, help="the quickstart's 36 epochs of 15 steps")
    parser.add_argument("--every", type=int, default=90)
    parser.add_argument("--jitter", type=float, default=16.8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onenip_bench/features.pt"))
    args = parser.parse_args()
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    data = cached_features(args.cache, epochs=6)
    channels, grid = data["train_eval"].shape[1], data["train_eval"].shape[-1]
    torch.manual_seed(args.seed)
    if args.impl == "ours":
        model = OneNIPModel(backbone="tf_efficientnet_lite0", pretrained=False, image_size=grid * 16,
                            dropout=args.dropout, jitter_scale=args.jitter)
        model.feature_extractor = None  # features are cached
    else:
        if args.official_code is None:
            raise SystemExit("--impl official needs --official-code (a checkout of gaobb/OneNIP)")
        model = OfficialAdapter(args.official_code, channels, grid, args.jitter, args.dropout)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=1e-4)
    held = data["train_eval"][:64]
    prompts = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(1))]
    total = (held - held.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean()
    print(f"{args.impl}, lr {args.lr}: features' mean square {held.pow(2).mean():.2f}, "
          f"per-channel variance {total:.2f} (the MSE of predicting each channel's mean)")
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = data["batches"][(step - 1) % len(data["batches"])]
        model.train()
        inputs = torch.cat([batch["clean"], batch["synthetic"]])
        targets = torch.cat([batch["clean"], batch["clean"]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reconstruction = model.reconstruct(inputs, batch["prompt"], jitter=True)
            mse = (reconstruction - targets).pow(2).mean()
            masks = torch.cat([torch.zeros_like(batch["mask"]), batch["mask"]])
            dice = 0.5 * dice_loss(model.refiner_logits((reconstruction - inputs).abs()), masks)
        optimizer.zero_grad()
        (mse + dice).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.1)
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            errors = {}
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                for mode in ("eval", "dropout"):
                    model.train(mode == "dropout")
                    errors[mode] = float((model.reconstruct(held, prompts) - held).pow(2).mean())
            print(f"step {step}: training MSE {float(mse):.2f} | reconstruction MSE eval mode {errors['eval']:.2f}, "
                  f"dropout on {errors['dropout']:.2f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
