"""Config files stack (lightning_modules/config_files.py): a data file + a detector file + a small override.

What is checked: the stacking rules (order, each file once, errors naming the file), the division of labour
between the files (a data file says where the data is and nothing about a detector; a detector file names no
dataset), that no two files repeat a block of settings, and that a dataset file resolves to exactly what its
parts give when stacked by hand on the command line.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from lightning_modules.config_files import ConfigFileError, expand_config_arguments, read_config, stacked_files
from tests.runs import REPO

CONFIGS = REPO / "configs"
CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml"))
DATA_FILES = sorted((CONFIGS / "data").glob("*.yaml"))
MODEL_FILES = sorted(CONFIGS.glob("*/model.yaml"))
REPEATED_BLOCK_LINES = 6  # this many consecutive setting lines shared by two files is a copy


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _setting_lines(path: Path) -> list[str]:
    """The file's lines without comments and blank lines (a trailing comment does not make a line different)."""
    lines = (re.sub(r"\s+#.*$", "", line).rstrip() for line in path.read_text().splitlines())
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _printed_config(args: list[str]) -> dict:
    from lightning_modules.cli import AnomalyCLI

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        AnomalyCLI(args=[*args, "--print_config"])
    return yaml.safe_load(printed.getvalue())


# ------------------------------------------------------------------------------ the stacking rules
def test_bases_come_first_depth_first_each_file_once(tmp_path):
    _write(tmp_path / "data.yaml", "data:\n  layout: folder\n")
    _write(tmp_path / "trainer.yaml", "trainer:\n  devices: 1\n")
    _write(tmp_path / "det" / "model.yaml", "bases: [../trainer.yaml]\nmodel: {class_path: X}\n")
    top = _write(tmp_path / "det" / "run.yaml", "bases: [../data.yaml, model.yaml, ../trainer.yaml]\nseed: 1\n")
    names = [path.relative_to(tmp_path).as_posix() for path in stacked_files(top)]
    assert names == ["data.yaml", "trainer.yaml", "det/model.yaml", "det/run.yaml"]
    assert expand_config_arguments(["--x=1", f"--config={top}", "--y=2"]) == [
        "--x=1", *[arg for path in stacked_files(top) for arg in ("--config", str(path))], "--y=2", "--bases=[]"]
    assert read_config(top) == {"data": {"layout": "folder"}, "trainer": {"devices": 1},
                                "model": {"class_path": "X"}, "seed": 1}


def test_a_file_without_bases_and_a_yaml_string_pass_through_unchanged(tmp_path):
    plain = _write(tmp_path / "plain.yaml", "seed_everything: 3\n")
    args = ["--config", str(plain), "--config", "{seed_everything: 4}", "--trainer.devices=1"]
    assert expand_config_arguments(args) == args


@pytest.mark.parametrize("text, message", [
    ("bases: [missing.yaml]\n", r"base config 'missing.yaml' does not exist"),
    ("bases: 3\n", r"must be a list of config file paths"),
    ("bases: [self.yaml]\n", r"cycle"),
    ("- a list\n", r"must be a mapping"),
    ("a: [unclosed\n", r"not valid YAML"),
])
def test_a_broken_stack_names_the_file(tmp_path, text, message):
    path = _write(tmp_path / "self.yaml", text)
    with pytest.raises(ConfigFileError, match=message) as raised:
        stacked_files(path)
    assert str(path) in str(raised.value)


def test_train_py_reports_a_missing_base_in_one_line_before_anything_starts(tmp_path):
    from lightning_modules.cli import run_command
    from train import train

    broken = _write(tmp_path / "run.yaml", "bases: [../data/nowhere.yaml]\n")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        run_command(train, ["--config", str(broken), f"--run.output_root={tmp_path / 'runs'}"])
    assert exit_info.value.code != 0
    assert f"{broken}: base config '../data/nowhere.yaml' does not exist" in stderr.getvalue()
    assert "Traceback" not in stderr.getvalue() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the division of labour
@pytest.mark.parametrize("path", DATA_FILES, ids=lambda path: path.stem)
def test_a_data_file_says_where_the_data_is_and_nothing_else(path):
    content = read_config(path)
    assert set(content) == {"data"} and {"layout"} <= set(content["data"]) <= {"layout", "root", "num_workers"}, path
    assert content["data"]["layout"] == path.stem


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda path: path.parent.name)
def test_a_detector_file_names_no_dataset(path):
    content = read_config(path)
    assert content["model"]["class_path"].startswith("lightning_modules.")
    assert not {"layout", "root", "num_workers"} & set(content.get("data", {})), path


def test_no_two_config_files_repeat_a_block_of_settings():
    """The acceptance of issue 20: `duplicates configs/` reports no pair (the tool reads no YAML, so this does)."""
    seen: dict[tuple[str, ...], Path] = {}
    repeats = []
    for path in CONFIG_FILES:
        lines = _setting_lines(path)
        for start in range(len(lines) - REPEATED_BLOCK_LINES + 1):
            block = tuple(lines[start:start + REPEATED_BLOCK_LINES])
            first = seen.setdefault(block, path)
            if first != path:
                repeats.append(f"{first.relative_to(REPO)} and {path.relative_to(REPO)}: {block[0].strip()} ...")
    assert not repeats, "\n".join(sorted(set(repeats)))


# ------------------------------------------------------------------------ resolved like by hand
@pytest.mark.parametrize("detector, dataset, extra", [
    ("onenip", "visa", []),
    ("ulsad", "mvtec_loco", ["--data.categories=breakfast_box"]),
    ("puad", "mvtec_ad", ["--data.categories=bottle"]),
])
def test_a_dataset_file_is_its_data_file_and_its_detector_file_stacked_by_hand(detector, dataset, extra):
    by_file = _printed_config(["--config", f"configs/{detector}/{dataset}.yaml", *extra])
    by_hand = _printed_config(["--config", f"configs/data/{dataset}.yaml",
                               "--config", f"configs/{detector}/model.yaml", *extra])
    assert by_file == by_hand
    assert by_file["bases"] == [] and by_file["data"]["layout"] == dataset
    assert by_file["model"]["class_path"] == read_config(CONFIGS / detector / "model.yaml")["model"]["class_path"]


def test_the_command_line_overrides_a_stacked_file_and_a_later_config_overrides_an_earlier(tmp_path):
    override = _write(tmp_path / "override.yaml", "trainer:\n  max_epochs: 3\n")
    printed = _printed_config(["--config", "configs/crad/quickstart.yaml", "--config", str(override),
                               "--trainer.devices=1", "--model.init_args.smoothing_size=5"])
    assert printed["trainer"]["max_epochs"] == 3 and printed["trainer"]["gradient_clip_val"] == 0.1  # trainer/unified
    assert printed["model"]["init_args"]["smoothing_size"] == 5
    assert printed["data"]["layout"] == "embedded"  # from configs/data/embedded.yaml
