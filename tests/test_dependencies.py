"""Every third-party import is declared in pyproject.toml, and every module of the repository imports.

A package that is only installed by hand (or only arrives as somebody else's dependency) makes a
green run on one machine and a `ModuleNotFoundError` on a fresh one. The import statements are read
from the source (every `import`, also those inside functions, which importing the module would not
run), mapped to the distribution that provides them, and checked against the dependencies that
pyproject.toml declares: the project's own for the project, bench scripts and sweeps (plus, only for
imports inside a function, which run when an optional feature is used, the optional extras such as
`export` and `reference`); those plus the `dev` extra for the tests.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared as a dev dependency for Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# Folders that hold no source of ours (virtual environments, run outputs, caches).
SKIPPED_FOLDERS = {"runs", "data", "wandb", "build", "dist", "__pycache__", "node_modules"}


def normalize(distribution: str) -> str:
    """PEP 503 name normalisation: 'PyYAML' == 'pyyaml', 'efficientnet_pytorch' == 'efficientnet-pytorch'."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from requirement {requirement!r}")
    return normalize(match.group(1))


def declared_distributions(pyproject: Path = REPO / "pyproject.toml") -> tuple[set[str], set[str], set[str]]:
    """(runtime dependencies, dev extra, the other optional extras) as normalised distribution names.

    An extra that names the project itself (``anomaly-lab[export]``) stands for that extra's contents.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    own = normalize(project["name"])

    def expand(requirements: list[str]) -> set[str]:
        names = set()
        for requirement in requirements:
            if requirement_name(requirement) == own:
                for extra in re.findall(r"\[([^\]]+)\]", requirement)[0].split(","):
                    names |= expand(extras[extra.strip()])
            else:
                names.add(requirement_name(requirement))
        return names

    runtime = expand(project.get("dependencies", []))
    optional = set().union(*(expand(requirements) for name, requirements in extras.items() if name != "dev"))
    return runtime, expand(extras.get("dev", [])), optional


def source_files(root: Path = REPO) -> list[Path]:
    """Every .py file of the repository, outside hidden folders (.venv, .git, ...) and output folders."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if any(part.startswith(".") or part in SKIPPED_FOLDERS for part in parts):
            continue
        files.append(path)
    return files


def local_module_names(path: Path, root: Path = REPO) -> set[str]:
    """Names that refer to the repository itself: its top-level packages and scripts, and the
    scripts beside `path` (bench scripts import each other after putting their folder on sys.path)."""
    names = {p.stem for p in root.glob("*.py")} | {
        p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))
    }
    return names | {p.stem for p in path.parent.glob("*.py")}


def imported_modules(path: Path, inside_functions: bool | None = None) -> dict[str, int]:
    """Top-level names of the absolute imports in a file → first line: all of them (None), only those at
    module level (False), or only those inside a function (True)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = {id(node) for function in ast.walk(tree)
                   if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(function) if node is not function}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if inside_functions is not None and (id(node) in in_function) != inside_functions:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def undeclared_imports(files: Iterable[Path], allowed: set[str], root: Path = REPO,
                       inside_functions: bool | None = None) -> list[str]:
    """One line per import that no allowed distribution provides: 'file:line imports X (...)'."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        local = local_module_names(path, root)
        for module, line in sorted(imported_modules(path, inside_functions).items()):
            if module in sys.stdlib_module_names or module in local:
                continue
            where = f"{path.relative_to(root)}:{line} imports {module!r}"
            distributions = providers.get(module, [])
            if not distributions and normalize(module) in allowed:
                continue  # declared but not installed here (an optional extra, or a marker that excludes this Python)
            if not distributions:
                problems.append(f"{where}, which no installed distribution provides")
            elif not {normalize(d) for d in distributions} & allowed:
                problems.append(
                    f"{where} from {', '.join(sorted(set(distributions)))}, which pyproject.toml does not declare"
                )
    return problems


def test_every_third_party_import_is_declared_in_pyproject():
    runtime, dev, optional = declared_distributions()
    files = source_files()
    tests = [path for path in files if path.relative_to(REPO).parts[0] == "tests"]
    project = [path for path in files if path not in tests]
    assert len(project) >= 20 and len(tests) >= 15, "the scan missed the repository's sources"
    problems = (undeclared_imports(project, runtime, inside_functions=False)
                + undeclared_imports(project, runtime | optional, inside_functions=True)
                + undeclared_imports(tests, runtime | dev, inside_functions=False)
                # as in the project, a function may import an optional extra (the anomalib recorder in tests/official)
                + undeclared_imports(tests, runtime | dev | optional, inside_functions=True))
    assert not problems, "Undeclared dependencies:\n" + "\n".join(problems)


def test_the_check_names_the_file_and_the_undeclared_distribution(tmp_path):
    """The checker is not vacuous: filelock is installed (torch needs it) but nobody declares it."""
    (tmp_path / "mine.py").write_text("")
    script = tmp_path / "tool.py"
    script.write_text(
        "import os\nimport mine\nimport torch\n\ndef later():\n    from filelock import FileLock\n"
        "    import surely_not_a_real_module_42\n"
    )
    runtime, _, _ = declared_distributions()
    problems = undeclared_imports([script], runtime, root=tmp_path)
    assert len(problems) == 2, problems
    assert problems[0].startswith("tool.py:6 imports 'filelock' from filelock,")
    assert problems[1] == "tool.py:7 imports 'surely_not_a_real_module_42', which no installed distribution provides"
    assert undeclared_imports([script], runtime | {"filelock"}, root=tmp_path) == problems[1:]


def test_an_optional_extra_may_be_imported_only_inside_a_function(tmp_path):
    """`reference` (anomalib, for the benchmark) is declared but not installed: a function may import it
    lazily, a module may not import it at import time."""
    runtime, dev, optional = declared_distributions()
    assert {"anomalib", "onnx", "onnxruntime", "onnxscript"} <= optional
    assert {"onnxruntime"} <= dev  # the dev extra pulls in anomaly-lab[export]: the export tests run in CI
    script = tmp_path / "tool.py"
    script.write_text("import anomalib\n\ndef later():\n    import anomalib\n")
    assert undeclared_imports([script], runtime | optional, root=tmp_path, inside_functions=True) == []
    problems = undeclared_imports([script], runtime, root=tmp_path, inside_functions=False)
    assert len(problems) == 1 and problems[0].startswith("tool.py:1 imports 'anomalib'")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize(
    "path", [p for p in source_files() if p.name != "__init__.py"], ids=lambda p: str(p.relative_to(REPO))
)
def test_every_module_imports(path):
    """Import each module as its users do: packages by name, bench scripts from their own folder."""
    parts = path.relative_to(REPO).parts
    if parts[0] == "bench":
        name = f"bench_{path.stem}"
        sys.path.insert(0, str(path.parent))
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up while the class is built
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
            sys.modules.pop(name, None)
    else:
        module = importlib.import_module(_module_name(path))
    assert module.__file__ is not None
