"""Run folders: versioned instead of overwritten, shared by DDP ranks, resumable."""

import pytest

from lightning_modules.cli import RUN_DIR_ENV, resolve_run_dir


def test_new_runs_get_new_versions_and_resume_takes_the_latest(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    first = resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None)
    second = resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None)
    assert (first.name, second.name) == ("ulsad", "ulsad_v2")
    assert resolve_run_dir(str(tmp_path), "ulsad", resume=True, explicit=None) == second


def test_ddp_child_reuses_the_folder_rank_zero_chose(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    chosen = resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None)
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets in the re-executed child
    assert resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None) == chosen
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "elsewhere"))
    assert resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None) == tmp_path / "elsewhere"


def test_resume_without_an_earlier_run_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(FileNotFoundError, match="no earlier run folder"):
        resolve_run_dir(str(tmp_path), "never_ran", resume=True, explicit=None)


@pytest.fixture
def restore_tf32_flags():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(("precision", "tf32_off"), [("32-true", True), ("bf16-mixed", False)])
def test_full_precision_runs_turn_tf32_off(precision, tf32_off, tmp_path, monkeypatch, restore_tf32_flags):
    """The paper configs' `precision: 32-true` means IEEE float32 (the PUAD code turns TF32 off)."""
    import torch

    from lightning_modules.cli import AnomalyCLI
    from tests import fake_trees

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # e.g. set by another library
    root = fake_trees.make_mvtec_ad(tmp_path / "mvtec_ad")
    AnomalyCLI(args=[
        "--model=lightning_modules.ulsad.ULSAD", "--model.init_args.backbone=resnet18",
        "--model.init_args.pretrained=false", "--model.init_args.image_size=128", "--model.init_args.feature_channels=64",
        "--data.layout=mvtec_ad", f"--data.root={root}", "--data.image_size=128", f"--trainer.precision={precision}",
        f"--run.output_root={tmp_path / 'runs'}", "--wandb.mode=disabled",
    ])
    assert torch.backends.cuda.matmul.allow_tf32 is not tf32_off
    assert torch.backends.cudnn.allow_tf32 is not tf32_off
