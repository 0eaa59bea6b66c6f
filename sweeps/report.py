"""Turn a folder of finished runs into an ablation table.

    python sweeps/report.py runs/sweeps/ulsad_table3_ablation [--metric image_AUROC] [--subset all]
        [--markdown table3.md] [--per-run] [--where wandb.group=ulsad_table3_ablation ...]

Reads every `metrics.json` under the folder and the `config.yaml` next to it (the resolved config
train.py saves), finds the config keys whose values differ between runs (the swept parameters) and
prints one row per parameter setting: those values, the mean over categories and one column per
category, values ×100. Runs that differ only in `data.categories` (the paper's one model per
category) are merged into one row, so a sweep over switches × categories reads like the paper's
table; `--per-run` keeps one row per run instead. Works for runs made by run_offline.py and by a
W&B agent alike, as both write the same run folders.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as `python sweeps/report.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.reporting import (
    ALL_SUBSET,
    MEAN_GROUP,
    MISSING_VALUE_TEXT,
    MetricsTable,
    format_metric,
    read_metrics_json,
)
from sweeps.run_offline import render_value

CATEGORY_KEY = "data.categories"
# Keys that differ between runs without being an experimental choice: the run folder itself.
IGNORED_KEYS = ("trainer.default_root_dir",)
IGNORED_PREFIXES = ("run.",)
MEAN_COLUMN = "mean"


@dataclass
class RunResult:
    run_dir: Path
    parameters: dict[str, Any]  # the flattened resolved config: {"model.init_args.alpha_local": 0.5, ...}
    table: MetricsTable


@dataclass
class AblationRow:
    parameters: dict[str, str]  # swept key → displayed value
    mean: float
    per_category: dict[str, float]
    runs: int
    repeated: list[str]  # categories found in more than one run of this row; the last run (path order) counts


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"init_args": {"alpha_local": 0.5}}} → {"model.init_args.alpha_local": 0.5}; lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _natural_key(path: Path) -> list[Any]:
    """Path order with numbers compared as numbers, so `name_v10` comes after `name_v9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_runs(output_root: str | Path, console: Console | None = None) -> list[RunResult]:
    """Every run folder under `output_root` that has a metrics.json, in path order."""
    runs = []
    for metrics_path in sorted(Path(output_root).rglob("metrics.json"), key=_natural_key):
        run_dir = metrics_path.parent
        table, _ = read_metrics_json(metrics_path)
        config_path = run_dir / "config.yaml"
        if config_path.is_file():
            parameters = flatten_config(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
        else:
            parameters = {}
            if console is not None:
                console.print(f"[yellow]warning:[/yellow] {config_path} is missing; its parameters show as "
                              f"{MISSING_VALUE_TEXT}", highlight=False)
        runs.append(RunResult(run_dir, parameters, table))
    return runs


def select_runs(runs: Sequence[RunResult], where: Mapping[str, str]) -> list[RunResult]:
    """The runs whose config has every `key: value` of `where` (values compared as rendered on the CLI)."""
    return [run for run in runs if all(_display(run.parameters, key) == value for key, value in where.items())]


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _display(parameters: Mapping[str, Any], key: str) -> str:
    return render_value(parameters[key]) if key in parameters else MISSING_VALUE_TEXT


def swept_keys(runs: Sequence[RunResult]) -> list[str]:
    """Config keys whose value is not the same in every run (first-seen order)."""
    keys = dict.fromkeys(key for run in runs for key in run.parameters if not _is_ignored(key))
    return [key for key in keys if len({_display(run.parameters, key) for run in runs}) > 1]


def _metric_value(table: MetricsTable, group: str, subset: str, metric: str) -> float:
    value = table.rows.get((group, subset), {}).get(metric)
    return math.nan if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _sort_key(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order before other text; the dash (missing) last."""
    if text == MISSING_VALUE_TEXT:
        return (2, 0.0, "")
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def ablation_rows(runs: Sequence[RunResult], metric: str = "image_AUROC", subset: str = ALL_SUBSET,
                  merge_categories: bool = True) -> tuple[list[str], list[str], list[AblationRow]]:
    """(parameter columns, category columns, rows sorted by the parameters).

    With `merge_categories`, runs that differ only in data.categories form one row: its category
    columns come from the runs' per-category results and its mean is their mean (NaN ignored), as the
    papers average over categories. Otherwise every run is a row with its own mean.
    """
    keys = swept_keys(runs)
    if CATEGORY_KEY in keys:  # the category column last, so rows group by the experimental switches first
        keys = [key for key in keys if key != CATEGORY_KEY] + [CATEGORY_KEY]
    merge = merge_categories and CATEGORY_KEY in keys
    parameter_keys = [key for key in keys if not (merge and key == CATEGORY_KEY)]
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for index, run in enumerate(runs):
        setting = tuple(_display(run.parameters, key) for key in parameter_keys)
        groups.setdefault(setting if merge else (*setting, str(index)), []).append(run)

    rows = []
    for setting, members in groups.items():
        per_category: dict[str, float] = {}
        repeated = []
        for run in members:  # later runs (path order: name_v2 after name) replace earlier ones
            for category in run.table.categories():
                if category in per_category:
                    repeated.append(category)
                per_category[category] = _metric_value(run.table, category, subset, metric)
        if merge:
            mean = _mean(list(per_category.values()))
        else:
            mean = _metric_value(members[0].table, MEAN_GROUP, subset, metric)
        rows.append(AblationRow(dict(zip(parameter_keys, setting)), mean, dict(sorted(per_category.items())),
                                len(members), repeated))
    rows.sort(key=lambda row: [_sort_key(row.parameters[key]) for key in parameter_keys])
    categories = sorted({category for row in rows for category in row.per_category})
    return parameter_keys, categories, rows


def _short(key: str) -> str:
    """Column header: the last part of a dotted key (`alpha_local`), unambiguous in practice."""
    return key.rsplit(".", 1)[-1]


def _cells(row: AblationRow, parameter_keys: Sequence[str], categories: Sequence[str]) -> list[str]:
    return [
        *(row.parameters[key] for key in parameter_keys),
        format_metric(row.mean),
        *(format_metric(row.per_category.get(category)) for category in categories),
    ]


def render_table(parameter_keys: Sequence[str], categories: Sequence[str], rows: Sequence[AblationRow],
                 title: str) -> Table:
    table = Table(title=title)
    for key in parameter_keys:
        table.add_column(_short(key))
    table.add_column(MEAN_COLUMN, justify="right", style="bold")
    for category in categories:
        table.add_column(category, justify="right")
    for row in rows:
        table.add_row(*_cells(row, parameter_keys, categories))
    return table


def render_markdown(parameter_keys: Sequence[str], categories: Sequence[str], rows: Sequence[AblationRow],
                    title: str) -> str:
    header = [*(_short(key) for key in parameter_keys), MEAN_COLUMN, *categories]
    alignment = [*("---" for _ in parameter_keys), *("---:" for _ in range(1 + len(categories)))]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "| " + " | ".join(alignment) + " |"]
    lines += ["| " + " | ".join(_cells(row, parameter_keys, categories)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(output_root: str | Path, metric: str = "image_AUROC", subset: str = ALL_SUBSET,
           markdown: str | Path | None = None, merge_categories: bool = True,
           where: Mapping[str, str] | None = None, console: Console | None = None) -> list[AblationRow]:
    """Print the ablation table of the runs under `output_root` (and write it as markdown)."""
    console = console or Console()
    runs = select_runs(load_runs(output_root, console), where or {})
    if not runs:
        condition = f" with {', '.join(f'{k}={v}' for k, v in (where or {}).items())}" if where else ""
        raise FileNotFoundError(f"no metrics.json under {output_root}{condition}: no such run has finished yet")
    available = sorted({name for run in runs for metrics in run.table.rows.values() for name in metrics})
    if metric not in available:
        raise KeyError(f"metric {metric!r} is in no metrics.json under {output_root}; available: {', '.join(available)}")
    parameter_keys, categories, rows = ablation_rows(runs, metric, subset, merge_categories)
    title = f"{metric} ({subset}) ×100 — {len(runs)} runs in {output_root}"
    console.print(render_table(parameter_keys, categories, rows, title))
    if parameter_keys:
        console.print("parameters: " + ", ".join(parameter_keys), highlight=False)
    for row in rows:
        if row.repeated:
            setting = ", ".join(f"{_short(key)}={value}" for key, value in row.parameters.items()) or "all runs"
            console.print(f"[yellow]warning:[/yellow] {setting}: {', '.join(row.repeated)} found in several runs; "
                          "the last folder (path order) is shown", highlight=False)
    if markdown is not None:
        Path(markdown).write_text(render_markdown(parameter_keys, categories, rows, title), encoding="utf-8")
        console.print(f"markdown: {markdown}", highlight=False)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_root", type=Path, help="folder holding the run folders (searched recursively)")
    parser.add_argument("--metric", default="image_AUROC", help="e.g. image_AUROC, pixel_AUPRO, pixel_sPRO")
    parser.add_argument("--subset", default=ALL_SUBSET, help="all, or logical / structural on LOCO-style data")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this .md file")
    parser.add_argument("--per-run", action="store_true",
                        help="one row per run, even when runs differ only in data.categories")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs whose config has this value, e.g. wandb.group=ulsad_table3_ablation "
                             "(W&B agent runs share runs/); repeatable")
    args = parser.parse_args(argv)
    malformed = [condition for condition in args.where if "=" not in condition]
    if malformed:
        parser.error(f"--where needs KEY=VALUE, got {', '.join(malformed)}")
    where = dict(condition.split("=", 1) for condition in args.where)
    try:
        report(args.output_root, args.metric, args.subset, args.markdown, merge_categories=not args.per_run,
               where=where)
    except (FileNotFoundError, KeyError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.args[0]}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
