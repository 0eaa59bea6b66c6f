"""Shared fixtures: fake dataset trees (see tests/fake_trees.py) and a stand-in embedded generator."""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from tests import fake_trees


@pytest.fixture
def mvtec_ad_root(tmp_path: Path) -> Path:
    return fake_trees.make_mvtec_ad(tmp_path / "mvtec_ad")


@pytest.fixture
def loco_root(tmp_path: Path) -> Path:
    return fake_trees.make_mvtec_loco(tmp_path / "loco")


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """Replace `datamodules.embedded` by a module whose `ensure_embedded_dataset(root, seed)` writes
    a small LOCO tree under `root/generated` and records its calls (returned list)."""
    calls = []

    def ensure_embedded_dataset(root, seed: int = 0) -> Path:
        calls.append((Path(root), seed))
        target = Path(root) / "generated"
        if not target.exists():
            fake_trees.make_mvtec_loco(target, category="parts_tray")
        return target

    module = types.ModuleType("datamodules.embedded")
    module.ensure_embedded_dataset = ensure_embedded_dataset
    monkeypatch.setitem(sys.modules, "datamodules.embedded", module)
    return calls


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the HF-hub and torch-hub caches at empty folders and cut the network off."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    probes = []

    def unreachable(address, *args, **kwargs):
        probes.append(address)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    return probes


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> Path:
    from datamodules.embedded import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded", seed=0)
