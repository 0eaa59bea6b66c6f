"""Config files that stack: a run is a data file, a detector file and, for a paper setting, a small override.

A config file may name the files it builds on in a top-level ``bases:`` list (paths relative to the file):

    # configs/onenip/visa.yaml
    bases: [../data/visa.yaml, model.yaml]

The CLI turns ``--config configs/onenip/visa.yaml`` into ``--config configs/data/visa.yaml --config
configs/onenip/model.yaml --config configs/onenip/visa.yaml`` before jsonargparse reads anything, so the
merging is jsonargparse's own (each file deep-merged over the ones before it, as with repeated ``--config``
on the command line) and ``--print_config`` shows the resolved result. Written here because jsonargparse
has no include list: a nested ``config:`` key in a file replaces a whole group instead of merging into it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BASES_KEY = "bases"


class ConfigFileError(ValueError):
    """A config file whose ``bases:`` cannot be followed; the message names the file and the entry."""


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: not valid YAML ({error})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigFileError(f"{path}: a config file must be a mapping of keys, not a {type(content).__name__}")
    return content


def stacked_files(path: str | Path, _visiting: tuple[Path, ...] = ()) -> list[Path]:
    """`path` preceded by every file its ``bases:`` name (depth first, in order; each file once)."""
    path = Path(path)
    if path.resolve() in _visiting:
        chain = " -> ".join(str(p) for p in (*_visiting, path.resolve()))
        raise ConfigFileError(f"{path}: its bases form a cycle ({chain})")
    bases = _read_mapping(path).get(BASES_KEY) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigFileError(f"{path}: `{BASES_KEY}:` must be a list of config file paths, got {bases!r}")
    files: list[Path] = []
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))  # configs/data/x.yaml, not configs/det/../data/x.yaml
        if not base_path.is_file():
            raise ConfigFileError(f"{path}: base config {base!r} does not exist (looked for {base_path})")
        for stacked in stacked_files(base_path, (*_visiting, path.resolve())):
            if stacked.resolve() not in {known.resolve() for known in files}:
                files.append(stacked)
    return [*files, path]


def expand_config_arguments(args: Sequence[str]) -> list[str]:
    """The command line with every ``--config FILE`` preceded by the files FILE stacks on.

    ``--bases=[]`` is appended after an expansion so that the parsed (and saved, and printed) config holds
    no base list: the resolved config.yaml of a run is complete and reads back with no base files beside it.
    """
    expanded: list[str] = []
    stacked_any = False
    position = 0
    while position < len(args):
        arg = args[position]
        if arg == "--config" and position + 1 < len(args):
            value, position = args[position + 1], position + 2
        elif arg.startswith("--config="):
            value, position = arg.removeprefix("--config="), position + 1
        else:
            expanded.append(arg)
            position += 1
            continue
        if not Path(value).is_file():  # a YAML string, or a missing file jsonargparse reports itself
            expanded += ["--config", value]
            continue
        files = stacked_files(value)
        stacked_any = stacked_any or len(files) > 1
        for file in files:
            expanded += ["--config", str(file)]
    if stacked_any:
        expanded.append(f"--{BASES_KEY}=[]")
    return expanded


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config(path: str | Path) -> dict[str, Any]:
    """The keys a stacked config file sets, merged over its bases: for tools that need one value (the
    detector's class path, a model argument) without building the whole parser. Defaults are not filled in."""
    merged: dict[str, Any] = {}
    for file in stacked_files(path):
        merged = _deep_merge(merged, {k: v for k, v in _read_mapping(file).items() if k != BASES_KEY})
    return merged
