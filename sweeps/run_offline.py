"""Run a W&B sweep YAML on one machine, without a W&B server.

    python sweeps/run_offline.py sweeps/ulsad_table3_ablation.yaml [--max-runs N] [--dry-run]
        [--output-root runs/sweeps/<sweep name>] [--seed 0] [--values data.categories=a,b ...]
        [--extra --data.root=/data/mvtec_ad ...]

The W&B agent needs the sweep controller on the server; this runner reads the SAME YAML and plays
the controller's part locally: a grid becomes every combination of the `values` lists, random and
bayes sweeps become N points sampled with a fixed seed (no Bayesian optimisation offline). Each
point runs as `python train.py --config ... --key=value ...` in a subprocess, one after another,
with `--run.name=<sweep>-<index>`, `--run.output_root=<output root>` and the exact folder
(`--run.dir=<output root>/<sweep>-<index>[_vN]`) appended so runs never collide. Grid points come in
the W&B agent's order (parameters sorted by name, the last one varying fastest), so `--max-runs 15`
and `wandb agent --count 15` run the same trials. Each trial's folder holds `sweep_trial.json`, its
resume key: every argument of its command line (the sweep point, the config, and everything after
`--extra`). A trial whose folder with the same key has a metrics.json is skipped, so an interrupted
sweep resumes where it stopped; one with the same key that stopped mid-training (checkpoints/last.ckpt,
no metrics.json) continues with `--run.resume=true`. A folder made under another key (a smoke test
with `--extra --trainer.max_epochs=1`, an older runner) is never reused: the trial runs again in
the next version of the folder. `<output root>/runs.csv` records every point (index, name, status, run_dir, parameters) and
`<output root>/logs/<name>.log` each run's output. Arguments after `--extra` go last on every
command line, so they override the sweep (`--extra --trainer.max_epochs=1` for a smoke test).
Run it from the repository root, as the W&B agent is: the program and config paths are relative.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's default
SAMPLING_METHODS = ("random", "bayes")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "log_uniform", "int_uniform")
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")  # W&B's in-string environment macro
RUNS_CSV = "runs.csv"
FIXED_CSV_COLUMNS = ("index", "name", "status", "returncode", "seconds", "run_dir", "key")
TRIAL_FILE = "sweep_trial.json"  # in each trial's folder: its resume key and the arguments it hashes


class SweepError(ValueError):
    """A sweep YAML this runner cannot run, or a resume that would mix two different sweeps."""


@dataclass
class RunRecord:
    """One point of the sweep and what became of it."""

    index: int
    name: str
    parameters: dict[str, Any]
    command: list[str]
    key: str = ""  # the resume key: a hash of every argument that can change the result (resume_key)
    status: str = "pending"  # finished | skipped | failed | pending
    returncode: int | None = None
    seconds: float | None = None
    run_dir: Path | None = None

    def csv_row(self) -> dict[str, str]:
        row = {
            "index": str(self.index),
            "name": self.name,
            "status": self.status,
            "returncode": "" if self.returncode is None else str(self.returncode),
            "seconds": "" if self.seconds is None else f"{self.seconds:.1f}",
            "run_dir": "" if self.run_dir is None else str(self.run_dir),
            "key": self.key,
        }
        row.update({key: render_value(value) for key, value in self.parameters.items()})
        return row


# ---------------------------------------------------------------------------------------------- sweep YAML
def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep YAML as a dict, with its parameters checked to be flat CLI keys."""
    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:  # e.g. `command: [${env}, ...]`: `${` is not valid in a YAML flow list
        raise SweepError(f"{path}: not valid YAML (write `command` as a block list, `- ${{env}}`): {error}") from error
    if not isinstance(sweep, dict) or "parameters" not in sweep:
        raise SweepError(f"{path}: not a W&B sweep (no `parameters` mapping)")
    for key, spec in sweep["parameters"].items():
        if not isinstance(spec, dict):
            raise SweepError(f"{path}: parameter {key!r} must be a mapping with `value`, `values` or a distribution")
        if "parameters" in spec:
            # A nested sweep parameter reaches the CLI as one dict for `--model=...`, which replaces the whole
            # node (losing class_path); flat dotted names override one key each.
            raise SweepError(f"{path}: parameter {key!r} is nested; use flat dotted names such as "
                             f"`{key}.init_args.NAME`")
    return sweep


def sweep_name(path: str | Path) -> str:
    return Path(path).stem


def grid_points(parameters: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the `values` lists, in the W&B agent's order.

    W&B's grid (wandb/sweeps, ``HyperParameterSet.from_config`` and ``grid_search_next_runs``) takes the
    parameters sorted by name and walks ``itertools.product`` over them: the name that sorts last varies
    fastest. Bounded ``int_uniform`` parameters become their integer range, as there. Each point keeps the
    YAML's key order, so its command line reads like the file.
    """
    choices = []
    for key in sorted(parameters):
        spec = parameters[key]
        if "values" in spec:
            if not spec["values"]:
                raise SweepError(f"grid parameter {key!r} has an empty `values` list")
            choices.append(list(spec["values"]))
        elif "value" in spec:
            choices.append([spec["value"]])
        elif spec.get("distribution") == "int_uniform" and "min" in spec and "max" in spec:
            choices.append(list(range(int(spec["min"]), int(spec["max"]) + 1)))
        else:
            raise SweepError(f"grid parameter {key!r} needs `values` or `value`, not a distribution")
    combinations = [dict(zip(sorted(parameters), combination)) for combination in itertools.product(*choices)]
    return [{key: combination[key] for key in parameters} for combination in combinations]


def _sample_one(key: str, spec: Mapping[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        weights = spec.get("probabilities")
        return rng.choices(list(spec["values"]), weights=weights)[0]
    if "min" not in spec or "max" not in spec:
        raise SweepError(f"parameter {key!r} needs `value`, `values`, or `min` and `max`")
    low, high = spec["min"], spec["max"]
    # W&B's rule when no distribution is given: integer bounds mean int_uniform, otherwise uniform.
    default = "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
    distribution = spec.get("distribution", default)
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":  # bounds are the values themselves
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "log_uniform":  # W&B: bounds are natural-log exponents
        return math.exp(rng.uniform(low, high))
    if distribution == "int_uniform":  # inclusive at both ends, as in W&B
        return rng.randint(int(low), int(high))
    raise SweepError(f"parameter {key!r}: distribution {distribution!r} is not supported offline; "
                     f"use one of {', '.join(DISTRIBUTIONS)} or `values`")


def sampled_points(parameters: Mapping[str, Mapping[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` points drawn independently per parameter with `random.Random(seed)`: reproducible."""
    rng = random.Random(seed)
    return [{key: _sample_one(key, spec, rng) for key, spec in parameters.items()} for _ in range(count)]


def sweep_points(sweep: Mapping[str, Any], max_runs: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The points this runner will run: the (truncated) grid, or N sampled points for random/bayes."""
    method = sweep.get("method", "grid")
    parameters = sweep["parameters"]
    if method == "grid":
        points = grid_points(parameters)
        return points if max_runs is None else points[:max_runs]
    if method in SAMPLING_METHODS:
        count = max_runs if max_runs is not None else sweep.get("run_cap")
        if count is None:
            raise SweepError(f"a {method} sweep has no end: give --max-runs N (or `run_cap` in the YAML)")
        return sampled_points(parameters, int(count), seed)
    raise SweepError(f"unknown sweep method {method!r}; expected grid, random or bayes")


# ---------------------------------------------------------------------------------------------- command line
def render_value(value: Any) -> str:
    """A value as jsonargparse reads it: true/false, null, lists as YAML flow (`[layer2, layer3]`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=2**31, sort_keys=False).strip()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _plain(value: Any) -> Any:
    """Tuples → lists, so yaml.safe_dump accepts nested values."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def render_args(point: Mapping[str, Any]) -> list[str]:
    """`${args}`: one `--key=value` per parameter."""
    return [f"--{key}={render_value(value)}" for key, value in point.items()]


def build_command(sweep: Mapping[str, Any], point: Mapping[str, Any], run_name: str, output_root: Path,
                  extra: Sequence[str] = ()) -> list[str]:
    """The sweep's `command` with its macros filled in, then the run folder and the extra arguments."""
    macros = {
        "env": [],  # W&B prefixes /usr/bin/env; the interpreter below is already an absolute path
        "interpreter": [sys.executable],
        "program": [str(sweep["program"])],
        "args": render_args(point),
        "args_no_hyphens": [f"{key}={render_value(value)}" for key, value in point.items()],
        "args_no_equals": [part for key, value in point.items() for part in (f"--{key}", render_value(value))],
        "args_json": [json.dumps(dict(point))],
    }
    command: list[str] = []
    for element in sweep.get("command") or DEFAULT_COMMAND:
        element = str(element)
        if element.startswith("${") and element.endswith("}") and ":" not in element:
            name = element[2:-1]
            if name not in macros:
                raise SweepError(f"sweep command macro {element} is not supported offline")
            command += macros[name]
        else:
            command.append(ENVVAR_MACRO.sub(lambda match: os.environ.get(match.group(1), match.group(1)), element))
    return [*command, f"--run.name={run_name}", f"--run.output_root={output_root}", *extra]


# ---------------------------------------------------------------------------------------------- run folders
def trial_arguments(command: Sequence[str]) -> list[str]:
    """What a trial's result depends on: its command line without the interpreter (a new virtualenv path
    changes nothing) and without the run folder arguments (where it is written changes nothing)."""
    return [part for part in command[1:] if not part.startswith(("--run.name=", "--run.output_root=", "--run.dir="))]


def resume_key(command: Sequence[str]) -> str:
    """A short hash of ``trial_arguments``: equal keys mean the same program, config, point and extras."""
    return hashlib.sha256(json.dumps(trial_arguments(command)).encode()).hexdigest()[:16]


def _versions(output_root: Path, run_name: str) -> list[Path]:
    """The folders train.py's versioning gives ``run_name``: name, name_v2, name_v3, ... (existing ones)."""
    found = [path for path in [output_root / run_name, *output_root.glob(f"{run_name}_v*")] if path.is_dir()]
    return sorted(found, key=_version_number)


def _key_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / TRIAL_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError):
        return None


def finished_run_dir(output_root: Path, run_name: str, key: str | None = None) -> Path | None:
    """The newest folder of `run_name` holding a metrics.json (and, given `key`, made under that resume key)."""
    finished = [path for path in _versions(output_root, run_name) if (path / "metrics.json").is_file()
                and (key is None or _key_of(path) == key)]
    return finished[-1] if finished else None


def resumable_run_dir(output_root: Path, run_name: str, key: str) -> Path | None:
    """The newest folder of `run_name` made under `key` that stopped mid-training: last.ckpt, no metrics.json."""
    stopped = [path for path in _versions(output_root, run_name) if _key_of(path) == key
               and (path / "checkpoints" / "last.ckpt").is_file() and not (path / "metrics.json").is_file()]
    return stopped[-1] if stopped else None


def new_run_dir(output_root: Path, run_name: str) -> Path:
    """The first free version of `run_name` (train.py's naming), created atomically."""
    for version in range(1, 1000):
        path = output_root / (run_name if version == 1 else f"{run_name}_v{version}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise SweepError(f"{output_root}: 999 folders of {run_name} already exist")


def _version_number(path: Path) -> int:
    match = re.search(r"_v(\d+)$", path.name)
    return int(match.group(1)) if match else 1


def read_runs_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def check_same_sweep(previous_rows: Sequence[Mapping[str, str]], records: Sequence[RunRecord]) -> None:
    """Refuse to resume into a folder made by a different sweep: run names are indices, not contents."""
    previous = {row["name"]: row for row in previous_rows}
    for record in records:
        old = previous.get(record.name)
        if old is None:
            continue
        new = record.csv_row()
        changed = [key for key in record.parameters if old.get(key) != new[key]]
        if changed:
            raise SweepError(
                f"run {record.name} in this output root was made with other parameters "
                f"({', '.join(f'{key}: {old.get(key)} → {new[key]}' for key in changed)}); "
                "the sweep YAML or --seed changed since: use another --output-root"
            )


def write_runs_csv(path: Path, records: Sequence[RunRecord], earlier_rows: Sequence[Mapping[str, str]] = ()) -> None:
    """runs.csv: this invocation's records, plus earlier rows of runs outside it (a smaller --max-runs)."""
    rows = [record.csv_row() for record in records]
    names = {row["name"] for row in rows}
    rows += [dict(row) for row in earlier_rows if row["name"] not in names]
    rows.sort(key=lambda row: int(row["index"]))
    parameter_columns = [key for key in dict.fromkeys(key for row in rows for key in row) if key not in FIXED_CSV_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*FIXED_CSV_COLUMNS, *parameter_columns], restval="")
    writer.writeheader()
    writer.writerows(rows)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(temporary, path)  # a reader never sees half a file, even if the sweep is killed here


# ---------------------------------------------------------------------------------------------- the sweep
def parse_values(text: str) -> tuple[str, list[Any]]:
    """`data.categories=parts_tray,woven_tiles` → ("data.categories", ["parts_tray", "woven_tiles"]), each item
    read as YAML (`0.5` a number, `false` a boolean)."""
    key, equals, items = text.partition("=")
    if not equals or not key or not items:
        raise SweepError(f"--values needs KEY=V1,V2,..., got {text!r}")
    try:
        values = yaml.safe_load(f"[{items}]")
    except yaml.YAMLError as error:
        raise SweepError(f"--values {text!r}: the values are not a YAML list: {error}") from error
    return key, values


def with_values(sweep: Mapping[str, Any], overrides: Mapping[str, Sequence[Any]], path: str | Path) -> dict[str, Any]:
    """The sweep with some parameters' values replaced or added (`--values`): the categories of another dataset,
    or `seed_everything` for repeats. An added key must be a CLI key of train.py (it fails there otherwise)."""
    parameters = dict(sweep["parameters"])
    for key, values in overrides.items():
        if not values:
            raise SweepError(f"--values {key}: no values given")
        parameters[key] = {"values": list(values)}
    return {**sweep, "parameters": parameters}


def plan_sweep(sweep_path: str | Path, output_root: str | Path | None = None, max_runs: int | None = None,
               seed: int = 0, extra: Sequence[str] = (),
               values: Mapping[str, Sequence[Any]] | None = None) -> tuple[Path, list[RunRecord]]:
    """(absolute output root, one pending RunRecord per point with its full command line)."""
    sweep = with_values(load_sweep(sweep_path), values or {}, sweep_path)
    name = sweep_name(sweep_path)
    root = Path(output_root if output_root is not None else Path("runs") / "sweeps" / name).resolve()
    points = sweep_points(sweep, max_runs=max_runs, seed=seed)
    width = max(3, len(str(len(points) - 1)))
    records = []
    for index, point in enumerate(points):
        run_name = f"{name}-{index:0{width}d}"
        command = build_command(sweep, point, run_name, root, extra)
        records.append(RunRecord(index, run_name, point, command, key=resume_key(command)))
    return root, records


def run_sweep(sweep_path: str | Path, output_root: str | Path | None = None, max_runs: int | None = None,
              seed: int = 0, extra: Sequence[str] = (), dry_run: bool = False,
              console: Console | None = None, values: Mapping[str, Sequence[Any]] | None = None) -> list[RunRecord]:
    """Run every point one after another; a failure is recorded and the sweep goes on."""
    console = console or Console()
    root, records = plan_sweep(sweep_path, output_root, max_runs, seed, extra, values)
    if dry_run:
        for record in records:
            console.print(shlex.join(record.command), markup=False, highlight=False, soft_wrap=True)
        return records
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / RUNS_CSV
    earlier_rows = read_runs_csv(csv_path)
    check_same_sweep(earlier_rows, records)
    (root / "logs").mkdir(exist_ok=True)
    try:
        for record in records:
            _run_one(record, root, len(records), console)
            write_runs_csv(csv_path, records, earlier_rows)
    finally:  # also on Ctrl-C: what ran so far stays recorded
        write_runs_csv(csv_path, records, earlier_rows)
    counts = {status: sum(record.status == status for record in records) for status in ("finished", "skipped", "failed")}
    console.print(f"{len(records)} runs: {counts['finished']} finished, {counts['skipped']} skipped "
                  f"(already done), {counts['failed']} failed; table: python sweeps/report.py {root} --study {sweep_path}")
    return records


def _with_run_folder(command: list[str], run_dir: Path, resume: bool) -> list[str]:
    """The command with `--run.dir` (and `--run.resume=true`) after `--run.output_root`, so `--extra` stays last."""
    position = next(i for i, part in enumerate(command) if part.startswith("--run.output_root=")) + 1
    added = [f"--run.dir={run_dir}", *(["--run.resume=true"] if resume else [])]
    return [*command[:position], *added, *command[position:]]


def _run_one(record: RunRecord, root: Path, total: int, console: Console) -> None:
    """Run one point unless a folder with its resume key finished it; its output goes to logs/<name>.log."""
    done = finished_run_dir(root, record.name, record.key)
    if done is not None:
        record.status, record.run_dir = "skipped", done
        console.print(f"[dim]{record.name}: metrics.json exists in {escape(str(done))} (same key), skipped[/dim]")
        return
    console.print(f"[bold]{record.name}[/bold] ({record.index + 1}/{total}): "
                  + escape(" ".join(render_args(record.parameters))), highlight=False)
    run_dir = resumable_run_dir(root, record.name, record.key)
    if run_dir is not None:
        # An earlier attempt stopped mid-training (Ctrl-C, crash, time limit): continue it, don't start over.
        record.command = _with_run_folder(record.command, run_dir, resume=True)
        console.print(f"  resuming from {escape(str(run_dir / 'checkpoints' / 'last.ckpt'))}")
    else:
        run_dir = new_run_dir(root, record.name)
        (run_dir / TRIAL_FILE).write_text(json.dumps({"key": record.key, "arguments": trial_arguments(record.command)},
                                                     indent=1), encoding="utf-8")
        record.command = _with_run_folder(record.command, run_dir, resume=False)
    record.run_dir = run_dir
    log_path = root / "logs" / f"{record.name}.log"
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        log.write(shlex.join(record.command) + "\n\n")
        log.flush()
        completed = subprocess.run(record.command, stdout=log, stderr=subprocess.STDOUT, check=False)
    record.seconds = time.monotonic() - started
    record.returncode = completed.returncode
    if completed.returncode == 0 and (run_dir / "metrics.json").is_file():
        record.status = "finished"
        console.print(f"  [green]finished[/green] in {record.seconds:.0f} s → {escape(str(run_dir))}")
    else:
        record.status = "failed"
        reason = f"exit code {completed.returncode}" if completed.returncode != 0 else "exit code 0 but no metrics.json"
        console.print(f"  [red]failed[/red] ({reason}); log: {escape(str(log_path))}")


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a W&B sweep YAML, e.g. sweeps/ulsad_table3_ablation.yaml")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="first N grid points, or N sampled points for random/bayes (default: run_cap)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--output-root", type=Path, default=None, help="default runs/sweeps/<sweep name>")
    parser.add_argument("--seed", type=int, default=0, help="seed for random/bayes sampling")
    parser.add_argument("--values", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace (or add) a parameter's values, e.g. data.categories=parts_tray to run a LOCO study on "
                             "the embedded dataset, or seed_everything=0,1 for more seeds; repeatable")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every train.py command line (must come last)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        values = dict(parse_values(text) for text in args.values)
        records = run_sweep(args.sweep, args.output_root, args.max_runs, args.seed, args.extra, args.dry_run,
                            values=values)
    except SweepError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        return 2
    return 1 if any(record.status == "failed" for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
