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
