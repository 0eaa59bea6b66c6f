"""Run folders: versioned instead of overwritten, shared by DDP ranks, resumable."""

import time
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import RUN_DIR_ENV, resolve_run_dir


def test_new_runs_get_new_versions_and_resume_takes_the_latest(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    first = resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None)
    second = resolve_run_dir(str(tmp_path), "ulsad", resume=False, explicit=None)
    assert (first.name, second.name) == ("ulsad", "ulsad_v2")
    for run in (first, second):
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
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
        "--model.init_args.pretrained=false", "--model.init_args.feature_channels=64",
        "--data.layout=mvtec_ad", f"--data.root={root}", "--data.image_size=128", f"--trainer.precision={precision}",
        f"--run.output_root={tmp_path / 'runs'}", "--wandb.mode=disabled",
    ])
    assert torch.backends.cuda.matmul.allow_tf32 is not tf32_off
    assert torch.backends.cudnn.allow_tf32 is not tf32_off


def test_resume_takes_the_newest_folder_that_holds_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "ulsad" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ulsad" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "ulsad_v2").mkdir()  # e.g. a failed start of an older version, or a run killed before step 1
    assert resolve_run_dir(str(tmp_path), "ulsad", resume=True, explicit=None) == tmp_path / "ulsad"
    (tmp_path / "ulsad").rename(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="holds checkpoints/last.ckpt"):
        resolve_run_dir(str(tmp_path), "ulsad", resume=True, explicit=None)


@pytest.mark.parametrize("bad", ["--data.root=/nowhere/at/all", "--data.image_size=100"])
def test_a_failed_start_leaves_no_run_folder(bad, tmp_path, monkeypatch):
    from train import train

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from tests import fake_trees

    root = fake_trees.make_mvtec_ad(tmp_path / "mvtec_ad")
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs/quickstart_weights_free.yaml"), "--data.layout=mvtec_ad", f"--data.root={root}",
            "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=false",
            f"--run.output_root={tmp_path / 'runs'}", "--run.name=named", "--wandb.mode=disabled", bad]
    with pytest.raises(Exception):  # noqa: B017 - a data error or a model error; the folder is what matters
        train(args)
    assert not (tmp_path / "runs" / "named").exists()


def test_the_run_records_its_git_commit_and_command_line_in_the_config(tmp_path, monkeypatch):
    """config.yaml in the run folder (and the W&B config, built from the same config) says which code and which
    command made the run."""
    import subprocess

    import yaml

    from lightning_modules.cli import AnomalyCLI
    from tests import fake_trees
    from tests.runs import REPO

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    root = fake_trees.make_mvtec_ad(tmp_path / "mvtec_ad")
    args = ["--model=lightning_modules.ulsad.ULSAD", "--model.init_args.backbone=resnet18",
            "--model.init_args.pretrained=false", "--model.init_args.feature_channels=64", "--data.layout=mvtec_ad",
            f"--data.root={root}", "--data.image_size=128", f"--run.output_root={tmp_path / 'runs'}",
            "--wandb.mode=disabled", "--model.init_args.alpha_local=0.0"]
    cli = AnomalyCLI(args=args)
    saved = yaml.safe_load(cli.save_resolved_config().read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert saved["run"]["git_commit"] == head.stdout.strip()
        assert isinstance(saved["run"]["git_dirty"], bool)
    assert saved["run"]["command"].startswith("train.py --model=lightning_modules.ulsad.ULSAD ")
    assert saved["run"]["command"].endswith("--model.init_args.alpha_local=0.0")


def test_wandb_run_name_tags_and_group_come_from_the_settings_on_the_command_line():
    from lightning_modules.cli import wandb_identity

    args = ["--config", "configs/ulsad/mvtec_loco.yaml", "--model.init_args.alpha_local=0.0",
            "--model.init_args.use_tie_loss=false", "--data.categories=juice_bottle", "--seed_everything=1",
            "--data.root=/data/loco", "--trainer.devices=2", "--run.name=table3-004", "--wandb.mode=offline"]
    name, tags, group = wandb_identity("table3-004", args)
    assert name == "table3-004 alpha_local=0.0 use_tie_loss=false categories=juice_bottle seed=1"
    assert tags == ["alpha_local=0.0", "use_tie_loss=false", "categories=juice_bottle", "seed=1"]
    assert group == "ulsad/mvtec_loco alpha_local=0.0 use_tie_loss=false categories=juice_bottle"  # seeds together
    assert wandb_identity("ULSAD_embedded_all", ["--config", "configs/quickstart.yaml"]) == \
        ("ULSAD_embedded_all", [], "quickstart")


def test_the_config_goes_to_wandb_once_nested_not_again_as_module_hyperparameters(tmp_path, monkeypatch):
    from lightning_modules.cli import AnomalyCLI
    from tests import fake_trees

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    root = fake_trees.make_mvtec_ad(tmp_path / "mvtec_ad")
    cli = AnomalyCLI(args=["--model=lightning_modules.ulsad.ULSAD", "--model.init_args.backbone=resnet18",
                           "--model.init_args.pretrained=false", "--model.init_args.feature_channels=64",
                           "--data.layout=mvtec_ad", f"--data.root={root}", "--data.image_size=128",
                           f"--run.output_root={tmp_path / 'runs'}", "--wandb.mode=disabled"])
    # Lightning logs model and data module hyperparameters to every logger unless told not to: flat duplicates
    # of the nested config the W&B logger already holds.
    assert cli.model._log_hyperparams is False and cli.datamodule._log_hyperparams is False


def test_a_setting_given_as_a_mapping_names_the_run_by_its_entries():
    """A study row (`--model.init_args={alpha_local: 0.0, global_branch: false}`, either rendering) is its entries."""
    from lightning_modules.cli import wandb_identity

    for row in ("{alpha_local: 0.0, global_branch: false}", "{'alpha_local': 0.0, 'global_branch': False}"):
        args = ["--config", "configs/ulsad/mvtec_loco.yaml", f"--model.init_args={row}", "--seed_everything=2"]
        name, tags, group = wandb_identity("table3-001", args)
        assert name == "table3-001 alpha_local=0.0 global_branch=false seed=2"
        assert tags[:2] == ["alpha_local=0.0", "global_branch=false"] and tags[2] == "seed=2"
        assert group == "ulsad/mvtec_loco alpha_local=0.0 global_branch=false"


def test_the_final_checkpoint_goes_to_wandb_as_a_model_artifact_when_asked(tmp_path, monkeypatch):
    """An offline W&B run with --wandb.log_checkpoint=true records final.ckpt as a `model` artifact (synced later)."""
    from datamodules.embedded import generate_embedded_dataset
    from tests.runs import tiny_ulsad_args
    from train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = generate_embedded_dataset(tmp_path / "embedded", seed=0, image_size=128)
    logged = []
    import lightning_modules.cli as cli_module

    real = cli_module.log_checkpoint_artifact

    def recording(loggers, checkpoint, metadata):
        artifacts = real(loggers, checkpoint, metadata)
        logged.extend(artifacts)
        return artifacts

    monkeypatch.setattr("train.log_checkpoint_artifact", recording)
    args = [arg for arg in tiny_ulsad_args(root, tmp_path / "runs", "--run.name=art") if arg != "--wandb.mode=disabled"]
    results = train([*args, "--wandb.mode=offline", "--wandb.log_checkpoint=true"])
    assert len(logged) == 1
    artifact = logged[0]
    assert artifact.type == "model" and artifact.name.startswith("model-art")
    assert [entry.path for entry in artifact.manifest.entries.values()] == ["final.ckpt"]
    assert artifact.metadata["detector"] == "ULSAD" and 0.0 <= artifact.metadata["test/mean/image_AUROC"] <= 1.0
    offline_logs = list(Path(results["run_dir"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(offline_logs) == 1
    # The artifact's record, for `wandb sync`. W&B's service process writes the offline file after wandb.finish()
    # has returned (seen: the first 32 KiB block only, the rest half a second later), so wait for it.
    deadline = time.monotonic() + 60
    while b"model-art" not in offline_logs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert b"model-art" in offline_logs[0].read_bytes()
    config = yaml.safe_load((Path(results["run_dir"]) / "config.yaml").read_text())
    assert config["wandb"]["log_checkpoint"] is True  # recorded; the parser's default is False (README)
