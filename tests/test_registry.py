"""The detector registry (lightning_modules/registry.py) is the one list: every config file, the README's detector
row, the CLI's short names and ``--list-detectors`` agree with it, so a detector half-added is a failing test."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lightning_modules.config_files import read_config
from lightning_modules import registry
from lightning_modules.base import AnomalyDetector
from tests.runs import REPO


def test_every_config_file_belongs_to_the_registered_detector_it_names():
    """Each entry's configs exist and train its class; every file in configs/ is some entry's."""
    listed = {}
    for entry in registry.registered():
        assert issubclass(entry.load(), AnomalyDetector), entry.name
        for config in entry.configs:
            path = REPO / config
            assert path.is_file(), f"{entry.name}: {config} does not exist"
            assert read_config(path)["model"]["class_path"] == entry.class_path, config
            listed[config] = entry.name
    shared = {"data", "trainer"}  # no detector of their own: stacked under detectors' files
    on_disk = {str(path.relative_to(REPO)) for path in (REPO / "configs").rglob("*.yaml")
               if path.relative_to(REPO / "configs").parts[0] not in shared}
    assert on_disk == set(listed), f"configs no registered detector lists: {sorted(on_disk - set(listed))}"


def test_the_readme_names_every_registered_detector_with_its_module():
    detectors_row = next(line for line in (REPO / "README.md").read_text().splitlines()
                         if line.startswith("| Detectors |"))
    for entry in registry.registered():
        assert f"**{entry.name}**" in detectors_row, entry.name
        assert f"`{entry.module.replace('.', '/')}.py`" in detectors_row, entry.module


def test_list_detectors_prints_one_line_per_detector():
    text = subprocess.run([sys.executable, "train.py", "--list-detectors"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=True).stdout
    lines = text.strip().splitlines()
    assert [line.split()[0] for line in lines] == [entry.name for entry in registry.registered()]
    assert all(entry.paper in line for entry, line in zip(registry.registered(), lines, strict=True))


def test_a_taken_name_cannot_be_registered_again():
    ulsad = next(entry for entry in registry.registered() if entry.name == "ULSAD")
    other = registry.DetectorEntry(name="ULSAD", module="tests.toy_detector", summary="-", paper="-", configs=(),
                                   test_settings={})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(other)
    assert registry.register(ulsad) is ulsad  # the same entry again is harmless
