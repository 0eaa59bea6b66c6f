"""Score every trained run of a study again under other settings, without training again.

    python sweeps/rescore.py runs/sweeps/puad_table1 \\
        --values model.init_args.score_mode=combined,picturable,unpicturable \\
        --values model.init_args.feature_source=student,teacher --recalibrate [--dry-run] [--extra ...]

Some ablations change how a trained model scores, not what it learns: PUAD's score_mode (which image score)
and feature_source (which features the Gaussian is fitted on). Comparing them on separately trained models
mixes seed noise into the difference; the papers compare them on the same model. For every finished run
under the folder (a `checkpoints/final.ckpt` beside `metrics.json`) and every combination of the values,
this runs `evaluate.py --checkpoint ... --output_dir <run>/rescored/<setting> --<key>=<value> ...`; with
`--recalibrate`, evaluate.py fits every statistic and threshold again on the training and held-out normal
images, which a fitted setting (feature_source) needs. The combination the run was trained with is not
repeated: its own metrics.json is that row. A combination whose folder already has a metrics.json is
skipped, so an interrupted rescore resumes. Each evaluation writes config.yaml beside its metrics.json, so
`sweeps/report.py <folder> --study <study>` sees the setting and puts every score in its row.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

if __package__ in (None, ""):  # run as `python sweeps/rescore.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.report import flatten_config
from sweeps.run_offline import SweepError, parse_values, render_value

RESCORED_FOLDER = "rescored"
REPO = Path(__file__).resolve().parents[1]


def trained_runs(root: Path) -> list[Path]:
    """Run folders under `root` with a final checkpoint and results (not the rescored folders themselves)."""
    found = [path.parent.parent for path in root.rglob("checkpoints/final.ckpt")]
    return sorted(path for path in found if (path / "metrics.json").is_file() and RESCORED_FOLDER not in path.parts)


def combinations(values: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(values)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(values[key] for key in keys))]


def folder_name(setting: Mapping[str, Any]) -> str:
    """`score_mode=picturable,feature_source=teacher`: readable, and one folder per setting."""
    return ",".join(f"{key.rsplit('.', 1)[-1]}={render_value(value)}" for key, value in setting.items())


def evaluate_command(run_dir: Path, setting: Mapping[str, Any], recalibrate: bool, extra: Sequence[str]) -> list[str]:
    output_dir = run_dir / RESCORED_FOLDER / folder_name(setting)
    return [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(run_dir / "checkpoints" / "final.ckpt"),
            "--output_dir", str(output_dir), *(f"--{key}={render_value(value)}" for key, value in setting.items()),
            *(["--recalibrate"] if recalibrate else []), *extra]


def rescore(root: Path, values: Mapping[str, Sequence[Any]], recalibrate: bool = False, extra: Sequence[str] = (),
            dry_run: bool = False, console: Console | None = None) -> dict[str, int]:
    """Evaluate every trained run under `root` in every setting; returns counts of done / skipped / failed."""
    console = console or Console()
    runs = trained_runs(root)
    if not runs:
        raise SweepError(f"no trained run under {root} (a checkpoints/final.ckpt beside a metrics.json)")
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for run_dir in runs:
        trained_with = flatten_config(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
        for setting in combinations(values):
            if all(render_value(trained_with.get(key)) == render_value(value) for key, value in setting.items()):
                counts["skipped"] += 1  # the run's own setting: its metrics.json is this row
                continue
            command = evaluate_command(run_dir, setting, recalibrate, extra)
            output_dir = Path(command[command.index("--output_dir") + 1])
            if dry_run:
                console.print(shlex.join(command), markup=False, highlight=False, soft_wrap=True)
                continue
            if (output_dir / "metrics.json").is_file():
                counts["skipped"] += 1
                continue
            output_dir.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]{escape(run_dir.name)}[/bold]: {escape(folder_name(setting))}", highlight=False)
            with (output_dir.parent / f"{output_dir.name}.log").open("w", encoding="utf-8") as log:
                log.write(shlex.join(command) + "\n\n")
                log.flush()
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, cwd=REPO)
            if completed.returncode == 0 and (output_dir / "metrics.json").is_file():
                counts["done"] += 1
            else:
                counts["failed"] += 1
                console.print(f"  [red]failed[/red] (exit code {completed.returncode}); log: "
                              f"{escape(str(output_dir.parent / f'{output_dir.name}.log'))}", highlight=False)
    console.print(f"{len(runs)} trained runs: {counts['done']} evaluations done, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed", highlight=False)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the study's output folder (searched recursively for trained runs)")
    parser.add_argument("--values", action="append", default=[], required=True, metavar="KEY=V1,V2",
                        help="a setting to score in, e.g. model.init_args.score_mode=combined,picturable; repeatable")
    parser.add_argument("--recalibrate", action="store_true",
                        help="fit every statistic again (needed when a fitted setting such as feature_source changes)")
    parser.add_argument("--dry-run", action="store_true", help="print the evaluate.py commands only")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every evaluate.py command line (must come last)")
    args = parser.parse_args(argv)
    try:
        values = dict(parse_values(text) for text in args.values)
        counts = rescore(args.root, values, args.recalibrate, args.extra, args.dry_run)
    except SweepError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False)
        return 2
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
