"""The sweep YAMLs, the offline runner and the ablation report, without training a model.

The YAMLs are checked against the real command line: every parameter value, rendered both the way
the W&B agent renders it and the way run_offline.py does, must parse with train.py's parser and
arrive unchanged in the config. One representative sweep point also goes through a real
`python train.py ... --print_config` subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from lightning_modules.config_files import expand_config_arguments, read_config
from sweeps import report, run_offline

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEPS_DIR = REPO_ROOT / "sweeps"
SWEEP_FILES = sorted(SWEEPS_DIR.glob("*.yaml"))
GRID_SWEEP_FILES = [path for path in SWEEP_FILES if yaml.safe_load(path.read_text()).get("method") == "grid"]
EXPECTED_SWEEPS = {"ulsad_table3_ablation", "ulsad_hparams", "ulsad_mvtec_ad_categories", "puad_table1",
                   "onenip_table4_ablation", "crad_ablation", "crad_grid_resolution", "ulsad_backbone",
                   "ulsad_quantiles"}
REPRESENTATIVE_SWEEP = SWEEPS_DIR / "ulsad_table3_ablation.yaml"
LOCO_CATEGORIES = ["breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"]
# The top-level keys and parameter forms of W&B's sweep configuration schema (wandb/sweeps, config/schema.json,
# read 2026-11-29): the schema has `additionalProperties: false` at the top and in every parameter form.
WANDB_TOP_LEVEL_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
                        "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
                        "early_terminate", "parameters"}
WANDB_PARAMETER_FORMS = [{"values"}, {"values", "distribution"}, {"values", "probabilities"},
                         {"values", "probabilities", "distribution"}, {"value"}, {"value", "distribution"},
                         {"min", "max"}, {"min", "max", "distribution"}, {"min", "max", "q", "distribution"},
                         {"mu", "sigma", "distribution"}, {"mu", "sigma", "q", "distribution"}]
MVTEC_AD_CATEGORIES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                       "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]


def _config_of(sweep: dict) -> str:
    command = [str(element) for element in sweep["command"]]
    return command[command.index("--config") + 1]


def _candidate_values(spec: dict) -> list[Any]:
    """The values a sweep can produce for one parameter: each listed value, or the ends of a range."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def _same_value(parsed: Any, expected: Any) -> bool:
    if isinstance(expected, dict):  # a study row: every entry arrives (jsonargparse gives a Namespace)
        return all(_same_value(parsed[key], value) for key, value in expected.items())
    if isinstance(expected, bool) or expected is None:
        return parsed is expected
    if isinstance(expected, (int, float)):
        return isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and math.isclose(parsed, expected)
    if isinstance(expected, (list, tuple)):
        return list(parsed) == list(expected)
    return parsed == expected


# ---------------------------------------------------------------------------------------------- the YAMLs
def test_the_expected_sweeps_exist():
    assert EXPECTED_SWEEPS <= {path.stem for path in SWEEP_FILES}


@pytest.mark.parametrize("sweep_path", SWEEP_FILES, ids=lambda path: path.stem)
def test_sweep_yaml_is_a_train_py_sweep_with_flat_cli_keys(sweep_path: Path):
    sweep = run_offline.load_sweep(sweep_path)  # raises on nested parameters
    assert sweep["program"] == "train.py"
    command = [str(element) for element in sweep["command"]]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"]
    assert "${args}" in command and command.index("${args}") > command.index("--config")
    assert (REPO_ROOT / _config_of(sweep)).is_file(), f"{sweep_path.name}: {_config_of(sweep)} does not exist"
    assert sweep["metric"] == {"name": "test/mean/image_AUROC", "goal": "maximize"}
    assert sweep["method"] in ("grid", "random", "bayes")
    assert set(sweep) <= WANDB_TOP_LEVEL_KEYS, f"{sweep_path.name}: not W&B keys {set(sweep) - WANDB_TOP_LEVEL_KEYS}"
    assert isinstance(sweep.get("description", ""), str)
    for key, spec in sweep["parameters"].items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key), f"{sweep_path.name}: W&B refuses the name {key}"
        assert set(spec) in WANDB_PARAMETER_FORMS, f"{sweep_path.name}: {key} is no W&B parameter form: {set(spec)}"
        assert "." in key or key == "seed_everything", f"{sweep_path.name}: {key} is not a dotted CLI key"
        assert set(spec) & {"value", "values", "min"}, f"{sweep_path.name}: {key} has no values"
        # W&B renders None as the text "None", which jsonargparse does not read as null.
        assert None not in _candidate_values(spec), f"{sweep_path.name}: {key} has a null value"
        if sweep["method"] == "grid":
            assert set(spec) & {"value", "values"}, f"{sweep_path.name}: grid parameter {key} needs values"


TABLE3_ROWS = [  # (global branch, α, β, tie, att) of the paper's rows 1-10, in order (the table)
    (False, 0.0, None, None, None), (True, 0.0, 0.0, False, False), (True, 0.0, 0.0, False, True),
    (True, 0.0, 0.0, True, False), (True, 0.0, 0.0, True, True), (False, 0.5, None, None, None),
    (True, 0.5, 0.5, False, False), (True, 0.5, 0.5, False, True), (True, 0.5, 0.5, True, False),
    (True, 0.5, 0.5, True, True)]
TABLE3_PAPER = [(77.67, 75.17, 73.37), (77.69, 79.77, 75.26), (71.67, 73.92, 67.22), (81.40, 82.12, 77.47),
                (81.08, 81.97, 76.45), (79.14, 76.57, 73.41), (80.50, 81.85, 77.35), (74.51, 76.59, 69.01),
                (82.19, 81.25, 75.50), (84.10, 80.06, 73.73)]


@pytest.mark.parametrize("sweep_path", SWEEP_FILES, ids=lambda path: path.stem)
def test_every_study_says_which_paper_table_it_reproduces_and_its_paper_rows_parse(sweep_path: Path):
    from lightning_modules.reporting import SHORT_METRIC_LABELS

    text = sweep_path.read_text()
    assert text.startswith("# ") and re.search(r"Table \d|ablation|study|categories|search", text.splitlines()[0])
    study = report.load_study(sweep_path)  # raises when the paper table and the row parameter disagree
    assert set(study.paper_metrics) <= set(SHORT_METRIC_LABELS), f"{sweep_path.name}: unknown metric names"
    if study.paper_rows:
        assert study.paper_source, f"{sweep_path.name}: the description's first line names the paper's table"


def test_table3_study_is_the_papers_ten_rows_on_mvtec_loco_in_the_papers_order():
    sweep = run_offline.load_sweep(REPRESENTATIVE_SWEEP)
    assert _config_of(sweep) == "configs/ulsad/mvtec_loco.yaml"
    points = run_offline.sweep_points(sweep)
    assert len(points) == 10 * 5
    rows = [(row.get("global_branch", True), row["alpha_local"], row.get("beta_global"), row.get("use_tie_loss"),
             row.get("use_attention_loss")) for row in sweep["parameters"]["model.init_args"]["values"]]
    assert rows == TABLE3_ROWS
    # W&B's order: data.categories sorts before model.init_args, so the category varies slowest: index = 10·c + r.
    for index, point in enumerate(points):
        assert point["data.categories"] == LOCO_CATEGORIES[index // 10]
        assert point["model.init_args"] == sweep["parameters"]["model.init_args"]["values"][index % 10]
    study = report.load_study(REPRESENTATIVE_SWEEP)
    assert study.row_parameter == "model.init_args" and study.paper_metrics == list(report.DEFAULT_METRICS)
    assert [row.number for row in study.paper_rows] == [str(n) for n in range(1, 11)]
    assert [tuple(row.values.values()) for row in study.paper_rows] == TABLE3_PAPER
    assert "Table 3" in study.paper_source and "LOCO" in study.paper_source


def test_category_sweep_runs_one_model_per_mvtec_ad_category():
    sweep = run_offline.load_sweep(SWEEPS_DIR / "ulsad_mvtec_ad_categories.yaml")
    assert [point["data.categories"] for point in run_offline.sweep_points(sweep)] == MVTEC_AD_CATEGORIES


@pytest.mark.parametrize("sweep_path", GRID_SWEEP_FILES, ids=lambda path: path.stem)
def test_grid_size_is_the_product_of_the_value_counts(sweep_path: Path):
    sweep = run_offline.load_sweep(sweep_path)
    expected = math.prod(len(spec.get("values", [None])) for spec in sweep["parameters"].values())
    points = run_offline.sweep_points(sweep)
    assert len(points) == expected
    assert len({json.dumps(point, sort_keys=True) for point in points}) == expected


# ---------------------------------------------------------------------------------------------- CLI keys
class _ParserCaptured(Exception):
    pass


@pytest.fixture(scope="module")
def print_config_run(tmp_path_factory):
    """`python train.py <point 17 of the Table 3 sweep> --print_config`, started in the background.

    The subprocess and the in-process parser (below) each spend seconds importing torch and Lightning;
    starting the subprocess first lets the two overlap, which keeps this file within its time budget.
    """
    root, records = run_offline.plan_sweep(REPRESENTATIVE_SWEEP, output_root=tmp_path_factory.mktemp("cfg") / "sweep",
                                           max_runs=16)
    point = records[15]  # juice_bottle (c = 1), row 6: the local branch alone with α = 0.5
    process = subprocess.Popen([*point.command, "--print_config"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    yield root, point, process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def cli_parser(print_config_run):
    """train.py's own parser, built once in this process (building the CLI and stopping before parsing)."""
    from lightning_modules.cli import AnomalyCLI

    class ParserOnly(AnomalyCLI):
        def parse_arguments(self, parser, args):
            raise _ParserCaptured(parser)

    with pytest.raises(_ParserCaptured) as captured:
        ParserOnly(args=[])
    parser = captured.value.args[0]
    parser.exit_on_error = False  # an unknown key raises instead of exiting
    return parser


def _wandb_agent_args(point: dict[str, Any]) -> list[str]:
    """The `${args}` the W&B agent itself builds (its own function, not a copy)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {key: {"value": value} for key, value in point.items()}})["args"]


def _rows(candidates: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Enough points to use every candidate value at least once (one parse per point, not per value)."""
    count = max((len(values) for values in candidates.values()), default=0)
    return [{key: values[index % len(values)] for key, values in candidates.items()} for index in range(count)]


@pytest.mark.parametrize("sweep_path", SWEEP_FILES, ids=lambda path: path.stem)
def test_every_parameter_value_parses_with_train_py_parser(sweep_path: Path, cli_parser):
    sweep = run_offline.load_sweep(sweep_path)
    config = _config_of(sweep)
    assert (REPO_ROOT / config).is_file(), f"{sweep_path.name} names a missing config {config}"
    class_path = read_config(REPO_ROOT / config)["model"]["class_path"]
    module_file = REPO_ROOT / (class_path.rsplit(".", 1)[0].replace(".", "/") + ".py")
    assert module_file.is_file(), f"{config} names a missing detector module {module_file}"
    candidates = {key: _candidate_values(spec) for key, spec in sweep["parameters"].items()}
    # The W&B agent writes str(value) (`True`, `['a', 'b']`); check those values in its rendering too.
    agent_differs = {key: [value for value in values if _wandb_agent_args({key: value})
                           != run_offline.render_args({key: value})] for key, values in candidates.items()}
    cases = [(point, run_offline.render_args(point)) for point in _rows(candidates)]
    cases += [(point, _wandb_agent_args(point)) for point in _rows({k: v for k, v in agent_differs.items() if v})]
    assert cases, f"{sweep_path.name} has no parameters"
    for point, rendered in cases:
        parsed = cli_parser.parse_args(expand_config_arguments(["--config", str(REPO_ROOT / config), *rendered]))
        for key, value in point.items():
            assert _same_value(parsed[key], value), f"{sweep_path.name}: {rendered} gave {key}={parsed[key]!r}"


def test_the_parser_check_rejects_an_unknown_key_and_a_wandb_none(cli_parser):
    from jsonargparse import ArgumentError

    config = str(REPO_ROOT / "configs/ulsad/mvtec_ad.yaml")
    with pytest.raises(ArgumentError, match="alpha_locall"):
        cli_parser.parse_args(expand_config_arguments(["--config", config, "--model.init_args.alpha_locall=0.5"]))
    # Why the YAMLs hold no null: the agent's `None` is not null to the CLI, ours is.
    key = "model.init_args.lambda_attn_cos"
    with pytest.raises(ArgumentError, match="lambda_attn_cos"):
        cli_parser.parse_args(expand_config_arguments(["--config", config, *_wandb_agent_args({key: None})]))
    arguments = expand_config_arguments(["--config", config, *run_offline.render_args({key: None})])
    assert cli_parser.parse_args(arguments)[key] is None


def test_representative_sweep_point_passes_train_py_print_config(print_config_run):
    """The exact command run_offline.py builds, with --print_config: parses, prints the values, trains nothing."""
    root, point, process = print_config_run
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    printed = report.flatten_config(yaml.safe_load(stdout))
    for key, value in point.parameters.items():
        entries = {f"{key}.{name}": item for name, item in value.items()} if isinstance(value, dict) else {key: value}
        for name, item in entries.items():
            assert _same_value(printed[name], item), f"{name}: printed {printed[name]!r}, swept {item!r}"
    assert point.parameters["data.categories"] == "juice_bottle" and printed["model.init_args.alpha_local"] == 0.5
    assert printed["model.init_args.global_branch"] is False
    assert printed["model.init_args.backbone"] == "wide_resnet50_2.racm_in1k"  # the row merged into the config
    assert printed["run.name"] == point.name == "ulsad_table3_ablation-015"
    assert printed["run.output_root"] == str(root)
    assert not root.exists(), "--print_config must not create the run folder"


# ---------------------------------------------------------------------------------------------- expansion
def test_grid_points_follow_the_wandb_agent_order_sorted_names_last_fastest():
    """wandb/sweeps sorts the parameters by name and walks itertools.product over them, so a YAML listing
    `model...` before `data.categories` still runs category slowest; each point keeps the YAML's key order."""
    parameters = {"z.lr": {"values": [1, 2]}, "b": {"value": "x"}, "a.category": {"values": ["m", "n"]},
                  "k": {"distribution": "int_uniform", "min": 3, "max": 4}}
    points = run_offline.grid_points(parameters)
    assert [(p["a.category"], p["k"], p["z.lr"]) for p in points] == [
        ("m", 3, 1), ("m", 3, 2), ("m", 4, 1), ("m", 4, 2), ("n", 3, 1), ("n", 3, 2), ("n", 4, 1), ("n", 4, 2)]
    assert list(points[0]) == ["z.lr", "b", "a.category", "k"] and points[0]["b"] == "x"
    assert len(run_offline.sweep_points({"method": "grid", "parameters": parameters}, max_runs=3)) == 3


def test_grid_rejects_distributions_bad_yaml_and_nested_parameters(tmp_path: Path):
    with pytest.raises(run_offline.SweepError, match="lr"):
        run_offline.grid_points({"lr": {"min": 0.1, "max": 1.0}})
    flow = tmp_path / "flow.yaml"
    flow.write_text("program: train.py\ncommand: [${env}, ${program}, ${args}]\nparameters: {a: {value: 1}}\n")
    with pytest.raises(run_offline.SweepError, match="flow.yaml.*block list"):
        run_offline.load_sweep(flow)
    nested = tmp_path / "nested.yaml"
    nested.write_text("program: train.py\nparameters:\n  model:\n    parameters:\n      lr: {values: [1]}\n")
    with pytest.raises(run_offline.SweepError, match="model.*nested"):
        run_offline.load_sweep(nested)


def test_sampling_is_seeded_bounded_and_follows_the_distribution():
    parameters = {
        "lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1},
        "alpha": {"distribution": "uniform", "min": 0.0, "max": 1.0},
        "epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
        "implicit_int": {"min": 10, "max": 11},
        "sigma": {"values": [2.0, 4.0]},
        "category": {"value": "screw"},
    }
    points = run_offline.sampled_points(parameters, 2000, seed=7)
    assert points == run_offline.sampled_points(parameters, 2000, seed=7)
    assert points != run_offline.sampled_points(parameters, 2000, seed=8)
    lrs = [point["lr"] for point in points]
    assert min(lrs) >= 1e-5 and max(lrs) <= 1e-1
    # Log-uniform: half the mass below the geometric mean 1e-3 (a uniform draw would put 1 % there).
    assert 0.45 < sum(lr < 1e-3 for lr in lrs) / len(lrs) < 0.55
    assert 0.45 < sum(point["alpha"] < 0.5 for point in points) / len(points) < 0.55
    assert {point["epochs"] for point in points} == {1, 2, 3}
    assert {point["implicit_int"] for point in points} == {10, 11}
    assert {point["sigma"] for point in points} == {2.0, 4.0}
    assert {point["category"] for point in points} == {"screw"}


def test_random_and_bayes_sweeps_need_a_count():
    parameters = {"alpha": {"min": 0.0, "max": 1.0}}
    with pytest.raises(run_offline.SweepError, match="--max-runs"):
        run_offline.sweep_points({"method": "bayes", "parameters": parameters})
    assert len(run_offline.sweep_points({"method": "bayes", "run_cap": 4, "parameters": parameters})) == 4
    assert len(run_offline.sweep_points({"method": "random", "run_cap": 4, "parameters": parameters},
                                        max_runs=2)) == 2
    hparams = run_offline.load_sweep(SWEEPS_DIR / "ulsad_hparams.yaml")
    assert len(run_offline.sweep_points(hparams)) == hparams["run_cap"]


def test_values_replace_or_add_a_parameter_and_change_the_runs(tmp_path: Path):
    assert run_offline.parse_values("data.categories=parts_tray,woven_tiles") == (
        "data.categories", ["parts_tray", "woven_tiles"])
    assert run_offline.parse_values("seed_everything=0,1") == ("seed_everything", [0, 1])
    assert run_offline.parse_values("model.init_args.use_tie_loss=true") == ("model.init_args.use_tie_loss", [True])
    for bad in ("data.categories", "=a", "data.categories="):
        with pytest.raises(run_offline.SweepError, match="KEY=V1,V2"):
            run_offline.parse_values(bad)
    values = {"data.categories": ["parts_tray"], "seed_everything": [0, 1]}
    _, records = run_offline.plan_sweep(REPRESENTATIVE_SWEEP, output_root=tmp_path, values=values)
    assert len(records) == 10 * 2  # the ten rows × two seeds on one category
    assert [(r.parameters["seed_everything"], r.parameters["data.categories"]) for r in records[:2]] == [
        (0, "parts_tray"), (1, "parts_tray")]  # W&B order: seed_everything sorts after model.init_args
    assert "--seed_everything=1" in records[1].command
    _, plain = run_offline.plan_sweep(REPRESENTATIVE_SWEEP, output_root=tmp_path)
    assert records[0].key != plain[0].key  # another point, another resume key


# ---------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize(("value", "text"), [
    (True, "true"), (False, "false"), (None, "null"), (0.5, "0.5"), (0, "0"), (1e-05, "1e-05"),
    ("bf16-mixed", "bf16-mixed"), (["layer2", "layer3"], "[layer2, layer3]"), ((1.0, 0.0), "[1.0, 0.0]"),
    ([[1, 2], [3]], "[[1, 2], [3]]"),
])
def test_render_value_as_jsonargparse_reads_it(value, text):
    assert run_offline.render_value(value) == text


def test_build_command_fills_the_macros_and_appends_run_folder_and_extras(monkeypatch):
    monkeypatch.setenv("SWEEP_DATA_ROOT", "/data/mvtec")
    sweep = {"program": "train.py",
             "command": ["${env}", "${interpreter}", "${program}", "--config", "c.yaml", "${args}",
                         "--data.root=${envvar:SWEEP_DATA_ROOT}"]}
    point = {"model.init_args.use_tie_loss": False, "model.init_args.layers": ["layer2", "layer3"]}
    command = run_offline.build_command(sweep, point, "s-003", Path("/out"), ["--trainer.devices=2"])
    assert command == [sys.executable, "train.py", "--config", "c.yaml", "--model.init_args.use_tie_loss=false",
                       "--model.init_args.layers=[layer2, layer3]", "--data.root=/data/mvtec",
                       "--run.name=s-003", "--run.output_root=/out", "--trainer.devices=2"]
    default = run_offline.build_command({"program": "p.py"}, {"a": 1}, "n", Path("/o"))
    assert default == [sys.executable, "p.py", "--a=1", "--run.name=n", "--run.output_root=/o"]
    with pytest.raises(run_offline.SweepError, match="args_json_file"):
        run_offline.build_command({"program": "p.py", "command": ["${args_json_file}"]}, {}, "n", Path("/o"))


# ---------------------------------------------------------------------------------------------- offline runs
FAKE_TRAIN = textwrap.dedent('''
    """Stand-in for train.py: writes config.yaml + metrics.json into --run.output_root/--run.name."""
    import json, sys
    from pathlib import Path
    import yaml

    args = dict(arg[2:].split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg)
    with open(Path(__file__).with_name("calls.txt"), "a") as calls:
        calls.write(" ".join(sys.argv[1:]) + "\\n")
    run_dir = Path(args.get("run.dir") or Path(args["run.output_root"]) / args["run.name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.get("trainer.max_epochs") == "crash":
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        sys.exit(9)
    alpha = float(args["model.init_args.alpha_local"])
    if alpha < 0:
        print("fake training diverged", file=sys.stderr)
        sys.exit(3)
    category = args["data.categories"]
    config = {"model": {"init_args": {"alpha_local": alpha}}, "data": {"categories": category},
              "run": {"name": args["run.name"]}, "trainer": {"default_root_dir": str(run_dir)}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    auroc = 0.9 - alpha / 10 + (0.05 if category == "b" else 0.0)
    metrics = {"run": {}, "per_category": {category: {"all": {"image_AUROC": auroc}}},
               "mean": {"all": {"image_AUROC": auroc}}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
''')


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_TRAIN)
    (tmp_path / "base.yaml").write_text("seed_everything: 0\n")
    sweep = {
        "program": str(program), "method": "grid",
        "command": ["${env}", "${interpreter}", "${program}", "--config", str(tmp_path / "base.yaml"), "${args}"],
        "parameters": {"model.init_args.alpha_local": {"values": [0.5, -1.0, 0.0]},
                       "data.categories": {"values": ["a", "b"]}},
    }
    path = tmp_path / "fake_sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _calls(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls.txt"
    return calls.read_text().splitlines() if calls.exists() else []


def test_run_offline_runs_every_point_records_failures_and_resumes(fake_sweep: Path, tmp_path: Path):
    root = tmp_path / "out"
    quiet = Console(record=True, width=200)
    records = run_offline.run_sweep(fake_sweep, output_root=root, console=quiet)
    # W&B's order: data.categories (sorts first) slowest, alpha_local fastest
    assert [record.status for record in records] == ["finished", "failed", "finished", "finished", "failed",
                                                     "finished"]
    assert [record.returncode for record in records] == [0, 3, 0, 0, 3, 0]
    assert len(_calls(tmp_path)) == 6
    assert "fake training diverged" in (root / "logs" / "fake_sweep-001.log").read_text()
    assert json.loads((root / "fake_sweep-005" / "metrics.json").read_text())["mean"]["all"]["image_AUROC"] == \
        pytest.approx(0.95)
    with (root / "runs.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["index"], row["status"], row["model.init_args.alpha_local"], row["data.categories"])
            for row in rows] == [("0", "finished", "0.5", "a"), ("1", "failed", "-1.0", "a"),
                                 ("2", "finished", "0.0", "a"), ("3", "finished", "0.5", "b"),
                                 ("4", "failed", "-1.0", "b"), ("5", "finished", "0.0", "b")]
    assert rows[0]["run_dir"] == str(root / "fake_sweep-000")

    # Second invocation: finished runs are skipped, only the failed points run again (and fail again).
    again = run_offline.run_sweep(fake_sweep, output_root=root, console=quiet)
    assert [record.status for record in again] == ["skipped", "failed", "skipped", "skipped", "failed", "skipped"]
    assert len(_calls(tmp_path)) == 8
    assert all("alpha_local=-1.0" in call for call in _calls(tmp_path)[6:])


def test_run_offline_cli_extra_args_go_last_and_exit_code_reports_failures(fake_sweep: Path, tmp_path: Path):
    root = tmp_path / "cli"
    assert run_offline.main([str(fake_sweep), "--max-runs", "1", "--output-root", str(root),
                             "--extra", "--trainer.max_epochs=1", "--seed_everything=3"]) == 0
    calls = _calls(tmp_path)
    assert len(calls) == 1 and calls[0].endswith(f"--run.dir={root / 'fake_sweep-000'} --trainer.max_epochs=1 "
                                                 "--seed_everything=3")
    assert run_offline.main([str(fake_sweep), "--max-runs", "3", "--output-root", str(root)]) == 1


def test_run_interrupted_mid_training_is_resumed_from_its_checkpoint(fake_sweep: Path, tmp_path: Path):
    root = tmp_path / "out"
    crashed = run_offline.run_sweep(fake_sweep, output_root=root, max_runs=1, console=Console(record=True),
                                    extra=["--trainer.max_epochs=crash"])  # the fake leaves last.ckpt, exits 9
    assert [record.status for record in crashed] == ["failed"]
    assert (root / "fake_sweep-000" / "checkpoints" / "last.ckpt").is_file()
    records = run_offline.run_sweep(fake_sweep, output_root=root, max_runs=1, console=Console(record=True),
                                    extra=["--trainer.max_epochs=crash"])
    assert _calls(tmp_path)[1].endswith(f"--run.dir={root / 'fake_sweep-000'} --run.resume=true "
                                        "--trainer.max_epochs=crash")
    assert [record.status for record in records] == ["failed"]  # the fake crashes again, in the same folder
    # The same trial under other arguments never resumes that folder: it starts fresh in the next version.
    run_offline.run_sweep(fake_sweep, output_root=root, max_runs=1, console=Console(record=True))
    assert _calls(tmp_path)[2].endswith(f"--run.dir={root / 'fake_sweep-000_v2'}")


def test_the_resume_key_covers_the_extra_arguments(fake_sweep: Path, tmp_path: Path):
    """A smoke test's results (--extra --trainer.max_epochs=1) never count as done for the real sweep."""
    root = tmp_path / "out"
    smoke = run_offline.run_sweep(fake_sweep, output_root=root, max_runs=2, extra=["--trainer.max_epochs=1"],
                                  console=Console(record=True))
    assert [record.status for record in smoke] == ["finished", "failed"]
    real = run_offline.run_sweep(fake_sweep, output_root=root, max_runs=2, console=Console(record=True))
    assert [record.status for record in real] == ["finished", "failed"]  # nothing skipped
    assert real[0].run_dir == root / "fake_sweep-000_v2" and real[0].key != smoke[0].key
    assert json.loads((root / "fake_sweep-000_v2" / run_offline.TRIAL_FILE).read_text())["key"] == real[0].key
    again = run_offline.run_sweep(fake_sweep, output_root=root, max_runs=2, console=Console(record=True))
    assert [record.status for record in again] == ["skipped", "failed"] and again[0].run_dir == real[0].run_dir
    # A folder from before resume keys (no sweep_trial.json) is not trusted either.
    (root / "fake_sweep-000_v2" / run_offline.TRIAL_FILE).unlink()
    assert run_offline.run_sweep(fake_sweep, output_root=root, max_runs=1, console=Console(record=True))[0].status \
        == "finished"
    assert len(_calls(tmp_path)) == 2 + 2 + 1 + 1


def test_dry_run_prints_commands_and_touches_nothing(fake_sweep: Path, tmp_path: Path):
    console = Console(record=True, width=500)
    records = run_offline.run_sweep(fake_sweep, output_root=tmp_path / "dry", dry_run=True, console=console)
    printed = console.export_text().splitlines()
    assert len(printed) == len(records) == 6
    assert "--model.init_args.alpha_local=-1.0 --data.categories=b --run.name=fake_sweep-004" in printed[4]
    assert not (tmp_path / "dry").exists() and _calls(tmp_path) == []


def test_resume_refuses_a_changed_sweep(fake_sweep: Path, tmp_path: Path):
    root = tmp_path / "out"
    run_offline.run_sweep(fake_sweep, output_root=root, max_runs=1, console=Console(record=True))
    changed = yaml.safe_load(fake_sweep.read_text())
    changed["parameters"]["model.init_args.alpha_local"]["values"] = [0.25]
    fake_sweep.write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(run_offline.SweepError, match="fake_sweep-000.*0.5 → 0.25"):
        run_offline.run_sweep(fake_sweep, output_root=root, console=Console(record=True))


# ---------------------------------------------------------------------------------------------- report
def _write_run(root: Path, name: str, config: dict, per_category: dict, mean: dict) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps({"run": {}, "per_category": per_category, "mean": mean}))


def _ulsad_config(alpha: float, tie: bool, category: str, name: str) -> dict:
    return {"seed_everything": 40, "run": {"name": name, "output_root": "x"},
            "trainer": {"default_root_dir": f"x/{name}", "max_epochs": 200},
            "model": {"class_path": "lightning_modules.ulsad.ULSAD",
                      "init_args": {"alpha_local": alpha, "use_tie_loss": tie, "layers": ["layer2", "layer3"]}},
            "data": {"categories": category}}


@pytest.fixture
def ablation_runs(tmp_path: Path) -> Path:
    """alpha × tie × {bottle, screw}, one run each; image_AUROC chosen so every mean is known exactly."""
    root = tmp_path / "runs"
    values = {(0.5, True): (0.98, 0.90), (0.5, False): (0.96, 0.80), (0.0, True): (0.94, 0.70),
              (0.0, False): (0.92, 0.60)}
    index = 0
    for (alpha, tie), per_category in values.items():
        for category, auroc in zip(("bottle", "screw"), per_category):
            name = f"ablation-{index:03d}"
            metrics = {"image_AUROC": auroc, "pixel_AUROC": auroc - 0.1}
            _write_run(root, name, _ulsad_config(alpha, tie, category, name), {category: {"all": metrics}},
                       {"all": metrics})
            index += 1
    return root


def _summary_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"│ {label} "))


def test_report_merges_categories_into_one_row_per_setting(ablation_runs: Path):
    console = Console(record=True, width=120)
    summary = report.report(ablation_runs, metrics=["image_AUROC", "pixel_AUROC"], console=console)
    rows = summary.rows
    assert [(row.setting["model.init_args.alpha_local"], row.setting["model.init_args.use_tie_loss"])
            for row in rows] == [("0.0", "false"), ("0.0", "true"), ("0.5", "false"), ("0.5", "true")]
    assert [row.mean for row in rows] == pytest.approx([0.76, 0.82, 0.88, 0.94])
    assert [row.cells["pixel_AUROC"]["mean"].mean for row in rows] == pytest.approx([0.66, 0.72, 0.78, 0.84])
    assert {c: cell.mean for c, cell in rows[3].cells["image_AUROC"].items()} == pytest.approx(
        {"mean": 0.94, "bottle": 0.98, "screw": 0.90})
    assert [row.runs for row in rows] == [2, 2, 2, 2] and all(row.repeated == [] for row in rows)
    text = console.export_text()
    assert "┃ alpha_local ┃ use_tie_loss ┃ I-AUROC ┃ P-AUROC ┃" in text
    assert "│ 0.0         │ false        │    76.0 │    66.0 │" in text
    assert "│ 0.5         │ true         │   98.0 │  90.0 │" in text  # the I-AUROC per-category table
    assert "runs: 8 runs: I-AUROC per category" in text  # titled by the folder's name, not its whole path
    assert "default_root_dir" not in text and "run.name" not in text and "layers" not in text


def _write_seeded_runs(root: Path) -> dict[tuple[float, int, str], dict[str, float]]:
    """alpha 0.5/0.0 × seeds 0/1 × categories a/b with unrelated metric values; returns what was written."""
    written = {}
    index = 0
    for alpha in (0.5, 0.0):
        for seed in (0, 1):
            for category in ("a", "b"):
                values = {"image_AUROC": 0.6 + 0.37 * ((index * 7) % 11) / 11,
                          "pixel_AUPRO": 0.5 + 0.41 * ((index * 5) % 13) / 13}
                config = {**_ulsad_config(alpha, True, category, f"s-{index}"), "seed_everything": seed}
                _write_run(root, f"s-{index:03d}", config, {category: {"all": values}}, {"all": values})
                written[(alpha, seed, category)] = values
                index += 1
    return written


def test_report_mean_and_std_over_seeds_equal_the_runs_metrics_json(tmp_path: Path):
    import statistics

    root = tmp_path / "seeded"
    _write_seeded_runs(root)
    summary = report.report(root, metrics=["image_AUROC", "pixel_AUPRO"], console=Console(record=True, width=80))
    # The expectations come from the metrics.json files themselves, read here independently of report.py.
    runs = []
    for path in sorted(root.rglob("metrics.json")):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        runs.append((config["model"]["init_args"]["alpha_local"], config["seed_everything"],
                     config["data"]["categories"], json.loads(path.read_text())["per_category"]))
    assert [row.setting for row in summary.rows] == [{"model.init_args.alpha_local": "0.0"},
                                                     {"model.init_args.alpha_local": "0.5"}]
    for row in summary.rows:
        alpha = float(row.setting["model.init_args.alpha_local"])
        assert row.seeds == ["0", "1"] and row.runs == 4
        for metric in ("image_AUROC", "pixel_AUPRO"):
            def value(seed, category, alpha=alpha, metric=metric):
                return next(m[category]["all"][metric] for a, s, c, m in runs if (a, s, c) == (alpha, seed, category))
            for category in ("a", "b"):
                cell = row.cells[metric][category]
                assert cell.mean == pytest.approx((value(0, category) + value(1, category)) / 2, abs=1e-12)
                assert cell.std == pytest.approx(statistics.stdev([value(0, category), value(1, category)]), abs=1e-12)
            seed_means = [(value(seed, "a") + value(seed, "b")) / 2 for seed in (0, 1)]
            assert row.cells[metric]["mean"].mean == pytest.approx(sum(seed_means) / 2, abs=1e-12)
            assert row.cells[metric]["mean"].std == pytest.approx(statistics.stdev(seed_means), abs=1e-12)
            assert row.cells[metric]["mean"].seeds == 2


STUDY_YAML = """\
program: train.py
method: grid
description: |
  Table 9 of A Paper (2031), mean over categories
  | row | setting | image_AUROC | pixel_AUPRO |
  |---|---|---|---|
  | 1 | with tie (ours) | 95.10 | 90.00 |
  | 2 | without tie | 91.00 | – |
command: [train.py]
parameters:
  data.categories:
    values: [bottle, screw]
  model.init_args:
    values:
      - {alpha_local: 0.5, use_tie_loss: true}
      - {alpha_local: 0.5, use_tie_loss: false}
"""


def test_report_with_a_study_orders_labels_and_compares_with_the_paper(ablation_runs: Path, tmp_path: Path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY_YAML)
    console = Console(record=True, width=80)
    summary = report.report(ablation_runs, metrics=["image_AUROC", "pixel_AUROC"], study=study,
                            where={"model.init_args.alpha_local": "0.5"}, console=console)
    assert [(row.number, row.label, row.mean) for row in summary.rows] == [
        ("1", "with tie (ours)", pytest.approx(0.94)), ("2", "without tie", pytest.approx(0.88))]
    assert summary.rows[0].paper == {"image_AUROC": 95.1, "pixel_AUPRO": 90.0}
    text = console.export_text()
    assert "┃ row ┃ setting         ┃ I-AUROC ┃ paper ┃ P-AUROC ┃" in text
    assert "│ 1   │ with tie (ours) │    94.0 │ 95.10 │    84.0 │" in text
    assert "paper = Table 9 of A Paper (2031), mean over categories." in " ".join(text.split())
    assert "warning" not in text


def test_report_warns_for_a_config_difference_outside_the_study_and_splits_by_it(ablation_runs: Path, tmp_path: Path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY_YAML)
    moved = yaml.safe_load((ablation_runs / "ablation-000" / "config.yaml").read_text())
    moved["data"]["root"] = "/elsewhere"
    (ablation_runs / "ablation-000" / "config.yaml").write_text(yaml.safe_dump(moved))
    console = Console(record=True, width=80)
    summary = report.report(ablation_runs, metrics=["image_AUROC"], study=study,
                            where={"model.init_args.alpha_local": "0.5"}, console=console)
    text = " ".join(console.export_text().split())
    assert "the runs differ in data.root (/elsewhere, –), which is not a parameter of the study" in text
    assert [(row.number, row.setting["data.root"], row.runs) for row in summary.rows] == [
        ("1", "/elsewhere", 1), ("1", "–", 1), ("2", "–", 2)]


def test_report_writes_markdown_csv_latex_and_a_chart_per_metric(ablation_runs: Path, tmp_path: Path):
    from PIL import Image

    study = tmp_path / "study.yaml"
    study.write_text(STUDY_YAML)
    out = tmp_path / "out"
    summary = report.report(ablation_runs, metrics=["image_AUROC", "pixel_AUROC"], study=study, out_dir=out,
                            where={"model.init_args.alpha_local": "0.5"}, console=Console(record=True))
    markdown = (out / "report.md").read_text().splitlines()
    assert "| row | setting | I-AUROC | paper | P-AUROC |" in markdown
    assert "| 1 | with tie (ours) | 94.0 | 95.10 | 84.0 |" in markdown
    assert "| 2 | without tie | 96.0 | 80.0 |" in markdown  # the I-AUROC per-category table
    with (out / "report.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 2 * 2 * 3  # rows × metrics × (mean + 2 categories)
    line = next(x for x in lines if (x["row"], x["metric"], x["column"]) == ("1", "image_AUROC", "screw"))
    assert float(line["mean"]) == pytest.approx(0.90) and line["label"] == "with tie (ours)" and line["std"] == ""
    assert next(x for x in lines if (x["row"], x["metric"], x["column"]) == ("1", "image_AUROC", "mean"))["paper"] \
        == "95.1"
    latex = (out / "report.tex").read_text()
    assert r"\toprule" in latex and r"1 & with tie (ours) & 94.0 & 95.10 & 84.0 \\" in latex
    for metric in summary.metrics:
        with Image.open(out / f"{metric}.png") as image:
            assert image.format == "PNG" and image.size[0] >= 800 and len(image.getcolors(2**20)) > 4


def test_report_tables_fit_80_columns_without_truncation(tmp_path: Path):
    """15 categories, mean ± std over two seeds and long labels still print whole in an 80-column log."""
    root = tmp_path / "wide"
    for index, (category, seed) in enumerate((c, s) for c in MVTEC_AD_CATEGORIES for s in (0, 1)):
        values = {"image_AUROC": 0.9 + index / 1000, "pixel_AUROC": 0.8, "pixel_AUPRO": 0.7}
        config = {**_ulsad_config(0.5, True, category, f"w-{index}"), "seed_everything": seed}
        _write_run(root, f"w-{index:03d}", config, {category: {"all": values}}, {"all": values})
    study = tmp_path / "study.yaml"
    study.write_text(STUDY_YAML.replace("with tie (ours)", "a rather long label that has to wrap somewhere"))
    console = Console(record=True, width=80)
    report.report(root, study=study, console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not any("…" in line for line in lines)
    text = "\n".join(lines)
    assert all(category in text for category in MVTEC_AD_CATEGORIES)
    assert "±" in text and "I-AUROC per category" in text


def test_report_per_run_and_an_unknown_metric(ablation_runs: Path):
    console = Console(record=True, width=120)
    summary = report.report(ablation_runs, metrics=["pixel_AUROC"], merge_categories=False, console=console)
    rows = summary.rows
    assert len(rows) == 8
    assert [row.setting["data.categories"] for row in rows[:2]] == ["bottle", "screw"]
    assert rows[0].mean == pytest.approx(0.82)
    assert {c: cell.mean for c, cell in rows[0].cells["pixel_AUROC"].items()} == pytest.approx(
        {"mean": 0.82, "bottle": 0.82})
    assert "│ 0.0         │ false        │ bottle     │    82.0 │" in console.export_text()
    with pytest.raises(KeyError, match="image_AP.*available: image_AUROC, pixel_AUROC"):
        report.report(ablation_runs, metrics=["image_AP"], console=console)


def test_report_warns_about_a_category_run_twice(ablation_runs: Path):
    rerun = {"image_AUROC": 0.5}
    _write_run(ablation_runs, "ablation-000_v2", _ulsad_config(0.5, True, "bottle", "ablation-000_v2"),
               {"bottle": {"all": rerun}}, {"all": rerun})
    console = Console(record=True, width=200)
    rows = report.report(ablation_runs, metrics=["image_AUROC"], console=console).rows
    assert rows[3].repeated == ["bottle (seed 40)"]
    assert rows[3].cells["image_AUROC"]["bottle"].mean == pytest.approx(0.5)
    assert "alpha_local=0.5 use_tie_loss=true: bottle (seed 40) found in several runs" in console.export_text()


def test_report_where_selects_runs_by_config_value(ablation_runs: Path):
    console = Console(record=True, width=200)
    rows = report.report(ablation_runs, where={"model.init_args.use_tie_loss": "true"}, console=console).rows
    assert [(row.setting, row.mean) for row in rows] == [
        ({"model.init_args.alpha_local": "0.0"}, pytest.approx(0.82)),
        ({"model.init_args.alpha_local": "0.5"}, pytest.approx(0.94))]
    with pytest.raises(FileNotFoundError, match="wandb.group=other"):
        report.report(ablation_runs, where={"wandb.group": "other"}, console=console)


def test_report_reads_a_loco_subset(tmp_path: Path):
    root = tmp_path / "loco"
    for index, mode in enumerate(("combined", "picturable")):
        per_category = {"screw_bag": {"all": {"image_AUROC": 0.8 + index / 10},
                                      "logical": {"image_AUROC": 0.7 + index / 10},
                                      "structural": {"image_AUROC": 0.9}}}
        config = {"model": {"init_args": {"score_mode": mode}}, "data": {"categories": "screw_bag"}}
        _write_run(root, f"puad-{index}", config, per_category, per_category["screw_bag"])
    rows = report.report(root, subset="logical", console=Console(record=True)).rows
    assert [(row.setting["model.init_args.score_mode"], row.mean) for row in rows] == [
        ("combined", pytest.approx(0.7)), ("picturable", pytest.approx(0.8))]


def test_report_on_an_offline_sweep_output(fake_sweep: Path, tmp_path: Path):
    root = tmp_path / "out"
    run_offline.run_sweep(fake_sweep, output_root=root, console=Console(record=True))
    rows = report.report(root, study=fake_sweep, console=Console(record=True)).rows
    # alpha -1 failed (no metrics.json): two settings remain in the study's order (0.5 before 0.0), each merged
    # over categories a and b.
    assert [(row.number, row.setting["model.init_args.alpha_local"], row.runs) for row in rows] == [
        ("1", "0.5", 2), ("3", "0.0", 2)]
    assert {c: cell.mean for c, cell in rows[1].cells["image_AUROC"].items()} == pytest.approx(
        {"mean": 0.925, "a": 0.9, "b": 0.95})
    assert rows[0].mean == pytest.approx((0.85 + 0.90) / 2)


def test_report_script_runs_standalone(ablation_runs: Path, tmp_path: Path):
    """`python sweeps/report.py ROOT` works without installing the repository."""
    completed = subprocess.run([sys.executable, str(SWEEPS_DIR / "report.py"), str(ablation_runs),
                                "--where", "model.init_args.alpha_local=0.5", "--out", str(tmp_path / "o")],
                               capture_output=True, text=True, timeout=120, cwd=ablation_runs, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "│ true         │    94.0 │    84.0 │" in completed.stdout
    assert (tmp_path / "o" / "image_AUROC.png").is_file()
    assert "alpha_local" not in completed.stdout  # constant within the selection


def test_report_puts_rows_that_are_none_of_the_papers_last_labelled_by_what_differs(ablation_runs: Path,
                                                                                     tmp_path: Path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY_YAML)
    rows = report.report(ablation_runs, metrics=["image_AUROC"], study=study, console=Console(record=True)).rows
    assert [(row.number, row.label) for row in rows] == [
        ("1", "with tie (ours)"), ("2", "without tie"),
        ("–", "alpha_local=0.0 use_tie_loss=false"), ("–", "alpha_local=0.0 use_tie_loss=true")]
