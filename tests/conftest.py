"""Shared fixtures: fake dataset trees (see tests/fake_trees.py) and a stand-in embedded generator."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

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
