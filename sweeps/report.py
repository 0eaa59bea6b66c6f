"""Turn a folder of finished runs into an ablation table, as the papers print them.

    python sweeps/report.py runs/sweeps/ulsad_table3_ablation --study sweeps/ulsad_table3_ablation.yaml \\
        [--metrics image_AUROC pixel_AUROC pixel_AUPRO] [--subset all] [--out report/] [--per-run] \\
        [--where wandb.group=ulsad_table3_ablation ...]

Reads every `metrics.json` under the folder and the resolved `config.yaml` beside it. Runs that differ
only in `data.categories` merge into one row (one model per category, averaged as the papers do) and
runs that differ only in `seed_everything` merge into mean ± std over seeds (sample std, n − 1).

With `--study` (the sweep file the runs came from) the rows are the study's settings, labelled and
ordered as in the paper: the order of each parameter's `values`, and the labels and the paper's own
numbers from the Markdown table in the study's `description`, printed beside ours. Any other config
key that differs between runs (a changed `data.root`) also splits rows, with a warning naming it:
averaging over it silently would mix two experiments. Without `--study`, every differing key is a
row key and rows are sorted by value.

Output: a summary (every metric side by side, the mean over categories), then a per-category table
per metric, in the console (fitted to its width); `--out DIR` also writes report.md, report.csv
(long format, one line per row × metric × column), report.tex (booktabs) and one bar chart per
metric (<metric>.png, error bars over seeds, the paper's value as a marker).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as `python sweeps/report.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.reporting import (
    ALL_SUBSET,
    METRIC_LEGEND,
    MISSING_VALUE_TEXT,
    SHORT_METRIC_LABELS,
    MetricsTable,
    read_metrics_json,
)
from sweeps.run_offline import render_value

CATEGORY_KEY = "data.categories"
SEED_KEY = "seed_everything"
# Keys that differ between runs without changing a result: the run folder, its provenance, logging and progress
# (an evaluate.py folder has trainer.logger false and W&B disabled where its training run had them on).
IGNORED_KEYS = ("trainer.default_root_dir", "trainer.logger", "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "trainer.enable_model_summary")
IGNORED_PREFIXES = ("run.", "wandb.")
MEAN_COLUMN = "mean"
DEFAULT_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
UNMATCHED = 10**6  # the order index of a value that is not among a study parameter's values
LABEL_WIDTH = 28  # console: a row's label wraps beyond this many characters


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class RunResult:
    run_dir: Path
    parameters: dict[str, Any]  # the flattened resolved config: {"model.init_args.alpha_local": 0.5, ...}
    table: MetricsTable


@dataclass
class PaperRow:
    number: str  # as the paper numbers it
    label: str
    values: dict[str, float]  # metric → the paper's value, ×100 as printed
    conditions: dict[str, str] = field(default_factory=dict)  # setting column (a config key or its last part) → value


@dataclass
class Study:
    """A sweep file read as a study: its parameters in order and, optionally, the paper's table."""

    name: str
    parameters: dict[str, list[Any]]  # key → the values in the file's order (a `value` is a one-item list)
    paper_source: str = ""  # the description's first line: which table of which paper
    paper_rows: list[PaperRow] = field(default_factory=list)
    row_parameter: str | None = None  # the parameter whose values are the paper's rows, in order

    @property
    def paper_metrics(self) -> list[str]:
        return list(dict.fromkeys(metric for row in self.paper_rows for metric in row.values))


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


def _parse_paper_table(description: str, path: Path) -> tuple[str, list[PaperRow]]:
    """The Markdown table in a study's description: `| row | setting | [<config key> ...] <metric> ... |`, values
    ×100. Columns between `setting` and the first metric name a config key (or its last part, `score_mode`) and
    give each row's value of it; without them the rows follow the row parameter's values in order."""
    lines = [line.strip() for line in description.splitlines()]
    source = next((line for line in lines if line and not line.startswith("|")), "")
    table = [line for line in lines if line.startswith("|")]
    if not table:
        return source, []
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    header, body = cells[0], [row for row in cells[1:] if not all(set(cell) <= set("-: ") for cell in row)]
    if header[:2] != ["row", "setting"] or len(header) < 3:
        raise ValueError(f"{path}: the paper table's header must be | row | setting | <metric> ... |, got {header}")
    first_metric = next((index for index, name in enumerate(header) if name in SHORT_METRIC_LABELS), len(header))
    if first_metric == len(header):
        raise ValueError(f"{path}: the paper table has no metric column ({', '.join(SHORT_METRIC_LABELS)})")
    rows = []
    for row in body:
        if len(row) != len(header):
            raise ValueError(f"{path}: paper table row {row} has {len(row)} cells, the header {len(header)}")
        values = {metric: float(text) for metric, text in zip(header[first_metric:], row[first_metric:])
                  if text not in ("", "-", "–")}
        rows.append(PaperRow(row[0], row[1], values, dict(zip(header[2:first_metric], row[2:first_metric]))))
    return source, rows


def load_study(path: str | Path) -> Study:
    """A sweep YAML as a study. Its paper table, if any, lives in `description` (the one free-text field of a
    W&B sweep config, which the W&B UI shows), and its rows follow the values of the row parameter: the
    parameter whose values are whole settings (mappings), else the first one with several values other
    than the category and the seed."""
    path = Path(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    parameters = {key: list(spec["values"]) if "values" in spec else [spec["value"]]
                  for key, spec in (document.get("parameters") or {}).items() if "values" in spec or "value" in spec}
    source, paper_rows = _parse_paper_table(str(document.get("description") or ""), path)
    varied = [key for key, values in parameters.items() if len(values) > 1 and key not in (CATEGORY_KEY, SEED_KEY)]
    settings = [key for key in varied if all(isinstance(value, Mapping) for value in parameters[key])]
    row_parameter = (settings or varied or [None])[0]
    if paper_rows and not paper_rows[0].conditions:
        count = len(parameters.get(row_parameter, [])) if row_parameter else 0
        if count != len(paper_rows):
            raise ValueError(f"{path}: the paper table has {len(paper_rows)} rows but the row parameter "
                             f"{row_parameter} has {count} values; they must correspond one to one, in order")
    return Study(path.stem, parameters, source, paper_rows, row_parameter)


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


def _study_keys(study: Study) -> list[str]:
    """The config keys a study sets: a parameter whose values are mappings sets one key per mapping entry."""
    keys: list[str] = []
    for key, values in study.parameters.items():
        if all(isinstance(value, Mapping) for value in values):
            keys += [f"{key}.{name}" for value in values for name in value]
        else:
            keys.append(key)
    return list(dict.fromkeys(keys))


def _value_index(parameters: Mapping[str, Any], key: str, values: Sequence[Any]) -> int:
    """Which of a study parameter's values a run used (its position), or UNMATCHED."""
    for index, value in enumerate(values):
        if isinstance(value, Mapping):
            if all(_display(parameters, f"{key}.{name}") == render_value(item) for name, item in value.items()):
                return index
        elif _display(parameters, key) == render_value(value):
            return index
    return UNMATCHED


def _condition_holds(parameters: Mapping[str, Any], name: str, value: str) -> bool:
    """A paper row's setting column: `name` is a full config key or the last part of exactly one."""
    keys = [name] if name in parameters else [key for key in parameters if _short(key) == name]
    return len(keys) == 1 and _display(parameters, keys[0]) == value


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Cell:
    """One metric of one row in one column (a category or the mean over categories), over seeds."""

    mean: float
    std: float  # sample standard deviation over seeds; NaN with one seed
    seeds: int


@dataclass
class AblationRow:
    setting: dict[str, str]  # row key → displayed value
    label: str
    number: str  # the paper's row number, or the position
    cells: dict[str, dict[str, Cell]]  # metric → column (category or "mean") → cell
    runs: int
    seeds: list[str]
    repeated: list[str]  # "category (seed s)" found in more than one run; the last run (path order) counts
    partial: bool = False  # covers fewer categories than the row with the most
    paper: dict[str, float] = field(default_factory=dict)
    order: tuple[int, ...] = ()

    @property
    def mean(self) -> float:
        """The first metric's mean over categories (the sweep's objective)."""
        return next(iter(self.cells.values()))[MEAN_COLUMN].mean


@dataclass
class Summary:
    rows: list[AblationRow]
    metrics: list[str]
    categories: list[str]
    row_keys: list[str]
    incidental: dict[str, list[str]]  # key that splits rows without being a study parameter → its values
    study: Study | None = None
    subset: str = ALL_SUBSET


def _cell(values: Sequence[float]) -> Cell:
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        return Cell(math.nan, math.nan, 0)
    return Cell(math.fsum(finite) / len(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan,
                len(finite))


def _metric_value(table: MetricsTable, category: str, subset: str, metric: str) -> float:
    value = table.rows.get((category, subset), {}).get(metric)
    return math.nan if value is None else float(value)


def _sort_key(text: str) -> tuple[int, float, str]:
    """Numbers in numeric order before other text; the dash (missing) last."""
    if text == MISSING_VALUE_TEXT:
        return (2, 0.0, "")
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _short(key: str) -> str:
    """A column header or label part: the last part of a dotted key (`alpha_local`)."""
    return key.rsplit(".", 1)[-1]


def summarise(runs: Sequence[RunResult], metrics: Sequence[str] = DEFAULT_METRICS, subset: str = ALL_SUBSET,
              study: Study | None = None, merge_categories: bool = True) -> Summary:
    """Group the runs into rows (see the module docstring) and compute every cell."""
    differing = swept_keys(runs)
    merged = {CATEGORY_KEY, SEED_KEY} if merge_categories else set()
    if study is not None:
        columns = {name for paper in study.paper_rows for name in paper.conditions}
        declared = [key for key in _study_keys(study) if key not in merged]
        declared += [key for key in differing if key not in declared and (key in columns or _short(key) in columns)]
        incidental_keys = [key for key in differing if key not in declared and key not in merged]
        row_keys = declared + incidental_keys
    else:
        incidental_keys = []
        row_keys = [key for key in differing if key not in merged]
        if not merge_categories:  # per run: the category and seed columns last
            row_keys = [key for key in row_keys if key not in (CATEGORY_KEY, SEED_KEY)]
            row_keys += [key for key in (CATEGORY_KEY, SEED_KEY) if key in differing]
    incidental = {key: sorted({_display(run.parameters, key) for run in runs}, key=_sort_key)
                  for key in incidental_keys}

    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for index, run in enumerate(runs):
        setting = tuple(_display(run.parameters, key) for key in row_keys)
        groups.setdefault(setting if merge_categories else (*setting, str(index)), []).append(run)

    rows = []
    for setting, members in groups.items():
        values: dict[str, dict[str, dict[str, float]]] = {}  # seed → category → metric → value
        repeated = []
        for run in members:  # later runs (path order: name_v2 after name) replace earlier ones
            seed = _display(run.parameters, SEED_KEY)
            per_seed = values.setdefault(seed, {})
            for category in run.table.categories():
                if category in per_seed:
                    repeated.append(category if seed == MISSING_VALUE_TEXT else f"{category} (seed {seed})")
                per_seed[category] = {metric: _metric_value(run.table, category, subset, metric) for metric in metrics}
        categories = sorted({category for per_seed in values.values() for category in per_seed})
        cells: dict[str, dict[str, Cell]] = {}
        for metric in metrics:
            column_cells = {category: _cell([per_seed[category][metric] for per_seed in values.values()
                                             if category in per_seed]) for category in categories}
            seed_means = [_cell([per_seed[category][metric] for category in per_seed]).mean
                          for per_seed in values.values()]
            cells[metric] = {MEAN_COLUMN: _cell(seed_means), **column_cells}
        parameters = dict(zip(row_keys, setting))
        rows.append(AblationRow(parameters, label="", number="", cells=cells, runs=len(members),
                                seeds=sorted(values, key=_sort_key), repeated=repeated))
    _order_and_label(rows, groups, row_keys, study)
    categories = sorted({category for row in rows for category in next(iter(row.cells.values())) if
                         category != MEAN_COLUMN})
    for row in rows:  # per run, a row is one run: its own categories are all it can cover
        row.partial = merge_categories and len(next(iter(row.cells.values()))) - 1 < len(categories)
    return Summary(rows, list(metrics), categories, row_keys, incidental, study, subset)


def _order_and_label(rows: list[AblationRow], groups: Mapping[tuple[str, ...], list], row_keys: Sequence[str],
                     study: Study | None) -> None:
    """Paper order, numbers and labels with a study; value order and `key=value` labels without one.

    A row that is none of the paper's is labelled by the keys whose values differ between rows and numbered "–".
    """
    varying = [key for key in row_keys if len({row.setting[key] for row in rows}) > 1] or list(row_keys)
    for row, members in zip(rows, groups.values()):
        row.label = " ".join(f"{_short(key)}={row.setting[key]}" for key in varying) or "all runs"
        if study is None:
            continue
        example = members[0].parameters
        row.order = tuple(_value_index(example, key, values) for key, values in study.parameters.items()
                          if key not in (CATEGORY_KEY, SEED_KEY))
        if study.paper_rows and study.paper_rows[0].conditions:  # the paper's rows name their settings
            position = next((index for index, paper in enumerate(study.paper_rows)
                             if all(_condition_holds(example, name, value) for name, value in paper.conditions.items())),
                            UNMATCHED)
            row.order = (position, *row.order)
        elif study.row_parameter is not None:  # the paper's rows are the row parameter's values, in order
            position = _value_index(example, study.row_parameter, study.parameters[study.row_parameter])
        else:
            position = UNMATCHED
        if position == UNMATCHED:
            row.number = MISSING_VALUE_TEXT
        elif study.paper_rows:
            paper = study.paper_rows[position]
            row.number, row.label, row.paper = paper.number, paper.label, paper.values
        else:
            row.number = str(position + 1)
    rows.sort(key=lambda row: (row.order, [_sort_key(row.setting[key]) for key in row_keys]))
    if study is None:
        for position, row in enumerate(rows, start=1):
            row.number = str(position)


# ---------------------------------------------------------------------------------------------- text
def format_cell(cell: Cell | None, latex: bool = False) -> str:
    """×100 with one decimal, `± std` over seeds when there are several; a dash when missing."""
    if cell is None or math.isnan(cell.mean):
        return MISSING_VALUE_TEXT if not latex else "--"
    text = f"{100 * cell.mean:.1f}"
    if cell.seeds > 1:
        text += (r"$\pm$" if latex else "±") + f"{100 * cell.std:.1f}"
    return text


def _paper_text(value: float | None) -> str:
    return MISSING_VALUE_TEXT if value is None else f"{value:.2f}"


def _label(metric: str) -> str:
    return SHORT_METRIC_LABELS.get(metric, metric)


def _title(summary: Summary, runs: int, folder: str) -> str:
    """The study's name, else the runs' folder name; how many runs; the subset unless it is "all"."""
    name = summary.study.name if summary.study else folder
    subset = "" if summary.subset == ALL_SUBSET else f", {summary.subset} subset"
    return f"{name}: {runs} runs{subset}"


def _row_cells(row: AblationRow, summary: Summary) -> list[str]:
    """The leading cells that name a row: number and label with a study, one cell per row key without."""
    if summary.study is not None:
        return [row.number, row.label]
    return [row.setting[key] for key in summary.row_keys] or [row.label]


def _row_headers(summary: Summary) -> list[str]:
    if summary.study is not None:
        return ["row", "setting"]
    return [_short(key) for key in summary.row_keys] or ["setting"]


def summary_columns(summary: Summary) -> list[tuple[str, str]]:
    """(header, kind) of the value columns of the summary: each metric, and the paper's value beside it."""
    columns = []
    for metric in summary.metrics:
        columns.append((_label(metric), metric))
        if summary.study and metric in summary.study.paper_metrics:
            columns.append(("paper", f"paper:{metric}"))
    return columns


def _summary_values(row: AblationRow, summary: Summary) -> list[str]:
    cells = []
    for _, kind in summary_columns(summary):
        if kind.startswith("paper:"):
            cells.append(_paper_text(row.paper.get(kind[6:])))
        else:
            mean = format_cell(row.cells[kind][MEAN_COLUMN])
            cells.append(mean + ("*" if row.partial and mean != MISSING_VALUE_TEXT else ""))
    return cells


def _rich_table(title: str, headers: Sequence[str], value_headers: Sequence[str], body: Sequence[Sequence[str]],
                caption: str = "") -> Table:
    table = Table(title=title, caption=caption or None, caption_justify="left", title_justify="left")
    for header in headers:
        table.add_column(header, overflow="fold")
    for header in value_headers:
        table.add_column(header, justify="right", no_wrap=True)
    for cells in body:
        table.add_row(*cells)
    return table


def _fitting_chunks(groups: Sequence[Sequence[int]], widths: Sequence[int], fixed: int, width: int) -> list[list[int]]:
    """Split groups of value columns (a metric and the paper's value beside it stay together) into tables
    that each fit `width`: a column costs its width + 3 (padding and border)."""
    chunks: list[list[int]] = [[]]
    used = fixed
    for group in groups:
        cost = sum(widths[index] + 3 for index in group)
        if chunks[-1] and used + cost > width:
            chunks.append([])
            used = fixed
        chunks[-1].extend(group)
        used += cost
    return chunks


def _print_chunked(console: Console, title: str, headers: Sequence[str], value_headers: Sequence[str],
                   body: Sequence[Sequence[str]], groups: Sequence[Sequence[int]], caption: str = "") -> None:
    """A table whose value columns never wrap, split into as many tables as the console's width needs."""
    named = len(headers)
    # The naming columns fold (wrap) beyond LABEL_WIDTH; the value columns never wrap, so they are split instead.
    fixed = 1 + sum(min(LABEL_WIDTH, max(len(header), *(len(cells[index]) for cells in body))) + 3
                    for index, header in enumerate(headers))
    widths = [max(len(header), *(len(cells[named + index]) for cells in body))
              for index, header in enumerate(value_headers)]
    chunks = _fitting_chunks(groups, widths, fixed, console.width)
    for number, chunk in enumerate(chunks, start=1):
        rows = [[*cells[:named], *(cells[named + index] for index in chunk)] for cells in body]
        console.print(_rich_table(title, headers, [value_headers[index] for index in chunk], rows,
                                  caption if number == len(chunks) else ""))


def print_summary(summary: Summary, title: str, console: Console) -> None:
    """The summary, then one per-category table per metric, each split so that it fits the console."""
    headers = _row_headers(summary)
    caption = METRIC_LEGEND + (" ± = sample std over seeds." if any(len(r.seeds) > 1 for r in summary.rows) else "")
    if summary.study and summary.study.paper_rows:
        caption += f" paper = {summary.study.paper_source or 'the paper'}."
    if any(row.partial for row in summary.rows):
        caption += " * a mean over fewer categories than other rows."
    columns = summary_columns(summary)
    groups: list[list[int]] = []
    for index, (_, kind) in enumerate(columns):
        if kind.startswith("paper:") and groups:
            groups[-1].append(index)
        else:
            groups.append([index])
    body = [[*_row_cells(row, summary), *_summary_values(row, summary)] for row in summary.rows]
    _print_chunked(console, f"{title}: mean over categories", headers, [header for header, _ in columns], body,
                   groups, caption)
    if len(summary.categories) < 2:
        return
    for metric in summary.metrics:
        body = [[*_row_cells(row, summary), *(format_cell(row.cells[metric].get(category))
                                              for category in summary.categories)] for row in summary.rows]
        _print_chunked(console, f"{title}: {_label(metric)} per category", headers, summary.categories, body,
                       [[index] for index in range(len(summary.categories))])


def render_markdown(summary: Summary, title: str) -> str:
    headers = _row_headers(summary)
    columns = summary_columns(summary)

    def table(value_headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
        align = [*("---" for _ in headers), *("---:" for _ in value_headers)]
        return ["| " + " | ".join([*headers, *value_headers]) + " |", "| " + " | ".join(align) + " |",
                *("| " + " | ".join(cells) + " |" for cells in body), ""]

    lines = [f"## {title}", ""]
    if summary.study and summary.study.paper_source:
        lines += [f"Paper: {summary.study.paper_source}", ""]
    lines += ["Mean over categories. " + METRIC_LEGEND + " ± = sample std over seeds; * = fewer categories.", ""]
    lines += table([header for header, _ in columns],
                   [[*_row_cells(row, summary), *_summary_values(row, summary)] for row in summary.rows])
    if len(summary.categories) > 1:
        for metric in summary.metrics:
            lines += [f"### {_label(metric)} per category", ""]
            lines += table([*summary.categories], [[*_row_cells(row, summary),
                                                    *(format_cell(row.cells[metric].get(c)) for c in summary.categories)]
                                                   for row in summary.rows])
    return "\n".join(lines)


def write_csv(summary: Summary, path: Path) -> None:
    """Long format: one line per row × metric × column (each category and the mean), values as fractions."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", *summary.row_keys, "metric", "column", "mean", "std", "seeds", "runs",
                         "paper"])
        for row in summary.rows:
            for metric in summary.metrics:
                for column, cell in row.cells[metric].items():
                    paper = row.paper.get(metric) if column == MEAN_COLUMN else None
                    writer.writerow([row.number, row.label, *(row.setting[key] for key in summary.row_keys), metric,
                                     column, "" if math.isnan(cell.mean) else repr(cell.mean),
                                     "" if math.isnan(cell.std) else repr(cell.std), cell.seeds, row.runs,
                                     "" if paper is None else paper])


def _latex_escape(text: str) -> str:
    return re.sub(r"([_&%#$])", r"\\\1", text).replace("±", r"$\pm$").replace("α", r"$\alpha$").replace(
        "β", r"$\beta$").replace("✓", r"\checkmark{}")


def render_latex(summary: Summary, title: str) -> str:
    headers = _row_headers(summary)
    columns = summary_columns(summary)
    lines = [r"% " + title, r"\begin{tabular}{" + "l" * len(headers) + "r" * len(columns) + "}", r"\toprule",
             " & ".join([*map(_latex_escape, headers), *(_latex_escape(h) for h, _ in columns)]) + r" \\",
             r"\midrule"]
    for row in summary.rows:
        values = []
        for _, kind in columns:
            if kind.startswith("paper:"):
                values.append(_paper_text(row.paper.get(kind[6:])).replace(MISSING_VALUE_TEXT, "--"))
            else:
                values.append(format_cell(row.cells[kind][MEAN_COLUMN], latex=True))
        lines.append(" & ".join([*map(_latex_escape, _row_cells(row, summary)), *values]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def plot_metrics(summary: Summary, out_dir: Path, title: str) -> list[Path]:
    """One horizontal bar chart per metric: rows top to bottom in table order, std over seeds as error bars,
    the paper's value as a black tick."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    labels = [f"{row.number}. {row.label}" if summary.study else row.label for row in summary.rows]
    for metric in summary.metrics:
        means = [100 * row.cells[metric][MEAN_COLUMN].mean for row in summary.rows]
        errors = [0.0 if math.isnan(row.cells[metric][MEAN_COLUMN].std) else 100 * row.cells[metric][MEAN_COLUMN].std
                  for row in summary.rows]
        figure, axes = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.4))
        positions = list(range(len(labels)))
        axes.barh(positions, means, xerr=errors, color="#4c72b0", capsize=3, label="ours (mean ± std over seeds)")
        paper = [(position, row.paper[metric]) for position, row in zip(positions, summary.rows) if metric in row.paper]
        if paper:
            axes.scatter([value for _, value in paper], [position for position, _ in paper], marker="|", s=300,
                         color="black", zorder=3, label="paper")
        finite = [value for value in means if not math.isnan(value)] + [value for _, value in paper]
        low = min(finite, default=0.0)
        axes.set_xlim(max(0.0, math.floor(low / 10) * 10 - 5), 100)
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()
        axes.set_xlabel(f"{metric} ×100 ({summary.subset}, mean over categories)")
        axes.set_title(title, fontsize=10)
        # Below the axes, so it never hides a bar.
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.45 * len(labels) + 1.4) - 0.12), ncol=2,
                    fontsize=8, frameon=False)
        figure.tight_layout()
        path = out_dir / f"{metric}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- entry points
def report(output_root: str | Path, metrics: Sequence[str] | None = None, subset: str = ALL_SUBSET,
           study: str | Path | Study | None = None, out_dir: str | Path | None = None, merge_categories: bool = True,
           where: Mapping[str, str] | None = None, console: Console | None = None) -> Summary:
    """Print the ablation tables of the runs under `output_root` and (with `out_dir`) write them as files."""
    console = console or Console()
    study = load_study(study) if isinstance(study, (str, Path)) else study
    runs = select_runs(load_runs(output_root, console), where or {})
    if not runs:
        condition = f" with {', '.join(f'{k}={v}' for k, v in (where or {}).items())}" if where else ""
        raise FileNotFoundError(f"no metrics.json under {output_root}{condition}: no such run has finished yet")
    available = sorted({name for run in runs for values in run.table.rows.values() for name in values})
    if metrics is None:
        wanted = (study.paper_metrics if study and study.paper_rows else []) or list(DEFAULT_METRICS)
        metrics = [metric for metric in wanted if metric in available] or available[:1]
    missing = [metric for metric in metrics if metric not in available]
    if missing:
        raise KeyError(f"metric {', '.join(map(repr, missing))} is in no metrics.json under {output_root}; "
                       f"available: {', '.join(available)}")
    summary = summarise(runs, metrics, subset, study, merge_categories)
    title = _title(summary, len(runs), Path(output_root).resolve().name)
    for key, values in summary.incidental.items():
        console.print(f"[yellow]warning:[/yellow] the runs differ in {key} ({', '.join(values)}), which is not a "
                      f"parameter of the study: rows are split by it", highlight=False)
    for row in summary.rows:
        if row.repeated:
            console.print(f"[yellow]warning:[/yellow] {row.label}: {', '.join(row.repeated)} found in several runs; "
                          "the last folder (path order) is shown", highlight=False)
    print_summary(summary, title, console)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(render_markdown(summary, title), encoding="utf-8")
        write_csv(summary, out / "report.csv")
        (out / "report.tex").write_text(render_latex(summary, title), encoding="utf-8")
        plots = plot_metrics(summary, out, title)
        console.print(f"written: {out / 'report.md'}, report.csv, report.tex, "
                      f"{', '.join(path.name for path in plots)}", highlight=False)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_root", type=Path, help="folder holding the run folders (searched recursively)")
    parser.add_argument("--study", type=Path, default=None,
                        help="the sweep file the runs came from: paper order, labels and the paper's numbers")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="e.g. image_AUROC pixel_AUPRO pixel_sPRO (default: the paper table's, else "
                             f"{' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--subset", default=ALL_SUBSET, help="all, or logical / structural on LOCO-style data")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write report.md, report.csv, report.tex and <metric>.png into this folder")
    parser.add_argument("--per-run", action="store_true", help="one row per run: no merging of categories or seeds")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs whose config has this value, e.g. wandb.group=ulsad_table3_ablation "
                             "(W&B agent runs share runs/); repeatable")
    args = parser.parse_args(argv)
    malformed = [condition for condition in args.where if "=" not in condition]
    if malformed:
        parser.error(f"--where needs KEY=VALUE, got {', '.join(malformed)}")
    where = dict(condition.split("=", 1) for condition in args.where)
    try:
        report(args.output_root, args.metrics, args.subset, args.study, args.out, merge_categories=not args.per_run,
               where=where)
    except (FileNotFoundError, KeyError, ValueError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.args[0]}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
