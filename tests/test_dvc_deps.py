"""dvc.yaml's code dependencies are the code each stage runs: no more, no less.

For every stage (``foreach`` expanded), the module its ``cmd`` runs (``-m stages.X``) is
followed through its imports, statically (``ast``, nothing is imported), and the set of repo
files reached must equal the ``.py`` entries of the stage's ``deps``. A missing file means
editing it does not rerun the stage; an extra one means a rerun for nothing.

Rules of the closure:
- every ``import`` / ``from ... import`` counts, at any depth (inside functions too: a lazy
  import still runs the module when the stage takes that path), relative ones included;
- ``from package import name`` follows ``name`` when it is a submodule;
- only files under the repository root count (torch, mlflow, ... are pinned elsewhere);
- a package's ``__init__.py`` counts only when it has code: an empty one cannot change a
  result, and listing it everywhere would be noise.
- a string constant naming a stage module (``"stages.train"``) counts: the code launches it
  as ``python -m`` (a compare cell runs its training and evaluation that way).
- the methods' modules, named ``"package.module:Class"`` in drkd/registry.py and imported when
  a run builds a method, count wherever drkd/methods/__init__.py (``build``) does.
No other ``importlib.import_module`` is followed; the code has none.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import dvc_stages

ROOT = Path(__file__).resolve().parents[1]


def module_files(module: str, root: Path) -> list[Path]:
    """The repo files that importing ``module`` (dotted) executes: each package's non-empty
    ``__init__.py`` on the way and the module itself; [] for a module outside the repo."""
    files: list[Path] = []
    path = root
    for part in module.split("."):
        path = path / part
        if (path / "__init__.py").is_file():
            init = path / "__init__.py"
            if init.read_text().strip():
                files.append(init)
        elif path.with_suffix(".py").is_file():
            files.append(path.with_suffix(".py"))
        else:
            return []  # not in the repo (third-party, stdlib), or a name that is no module
    return files


def module_name(file: Path, root: Path) -> str:
    """``root/drkd/data/coco.py`` -> ``drkd.data.coco``; a package's ``__init__`` -> the package."""
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_files(file: Path, root: Path, launched: bool = True) -> set[Path]:
    """The repo files ``file`` imports directly (any nesting depth in the source); with
    ``launched``, also the stage modules it launches and the methods ``build`` imports."""
    found: set[Path] = set()
    package = module_name(file, root)
    if file.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(module_files(alias.name, root))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z: relative to this package
                parts = package.split(".") if package else []
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(module_files(base, root))
            for alias in node.names:  # `from drkd import cli`: cli is a submodule
                found.update(module_files(f"{base}.{alias.name}", root))
        # launched: `launch(..., "stages.train", ...)`
        elif launched and isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                re.fullmatch(r"stages\.\w+", node.value)):
            found.update(module_files(node.value, root))
    # build() imports each registered module
    if launched and module_name(file, root) == "drkd.methods":
        registry = (root / "drkd" / "registry.py").read_text()
        for node in ast.walk(ast.parse(registry)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"[\w.]+:\w+", node.value):
                found.update(module_files(node.value.split(":")[0], root))
    return found


def import_closure(module: str, root: Path) -> set[Path]:
    """Every repo file that running ``python -m module`` can execute."""
    todo = module_files(module, root)
    assert todo, f"{module}: not a module of {root}"
    seen: set[Path] = set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file, root) - seen)
    return seen


def stage_module(cmd: str) -> str:
    """The module a stage command runs: ``python -m stages.X`` or ``${launcher} -m stages.X``
    (the launcher is python, or torchrun running python)."""
    match = re.match(r"\s*(?:python|\$\{launcher\})\s+-m\s+([\w.]+)", cmd)
    assert match, f"cmd does not run a python module: {cmd!r}"
    return match.group(1)


STAGES = {**dvc_stages(ROOT / "dvc.yaml"),
          **{f"compare/{k}": v for k, v in dvc_stages(ROOT / "compare" / "dvc.yaml").items()}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_its_import_closure(name: str) -> None:
    stage = STAGES[name]
    module = stage_module(stage["cmd"])
    needed = {f.relative_to(ROOT).as_posix() for f in import_closure(module, ROOT)}
    declared = {d for d in stage.get("deps", []) if d.endswith(".py")}
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not (missing or extra), (
        f"dvc.yaml stage {name} ({module}): "
        + (f"missing deps {missing} (imported); " if missing else "")
        + (f"extra deps {extra} (not imported)" if extra else "")
    )


def test_closure_rules(tmp_path: Path) -> None:
    """The closure follows lazy, relative and submodule imports, skips empty __init__.py and
    anything outside the root."""
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "X = 1\n",
        "pkg/sub/leaf.py": "from .. import helper\n",
        "pkg/helper.py": "import os\n",
        "pkg/lazy.py": "",
        "pkg/unused.py": "",
        "app/__init__.py": "",
        "app/main.py": (
            "import torch\nfrom pkg.sub import leaf\n"
            "def f() -> None:\n    import pkg.lazy\n"
            "LAUNCHED = 'stages.run'\n"
        ),
        "stages/__init__.py": "",
        "stages/run.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    closure = {f.relative_to(tmp_path).as_posix() for f in import_closure("app.main", tmp_path)}
    assert closure == {
        "app/main.py",
        "pkg/sub/__init__.py",
        "pkg/sub/leaf.py",
        "pkg/helper.py",
        "pkg/lazy.py",
        "stages/run.py",
    }


def test_compare_cells_do_not_depend_on_the_board() -> None:
    """Restyling the leaderboard reruns only the board: no cell (and not the rows stage)
    depends on its code, which the board stage does."""
    board_code = {"drkd/leaderboard.py", "stages/leaderboard.py"}
    cell = STAGES["compare/cell"]
    assert not board_code & set(cell["deps"]), cell["deps"]
    assert not board_code & set(STAGES["compare/rows"]["deps"])
    assert board_code <= set(STAGES["compare/leaderboard"]["deps"])


STAGE_FILES = sorted((ROOT / "stages").glob("[!_]*.py"))


@pytest.mark.parametrize("file", STAGE_FILES, ids=lambda f: f.stem)
def test_stage_is_thin_and_imports_no_stage(file: Path) -> None:
    """A stage is argument parsing plus a call into drkd/: short, and never importing another
    stage (or being imported by drkd/), so the recipe lives in one place. Launching another
    stage as ``python -m`` (a compare cell does) is not an import."""
    lines = len(file.read_text().splitlines())
    assert lines <= 80, f"{file.name}: {lines} lines; move the logic into drkd/"
    imported = {f.relative_to(ROOT).as_posix() for f in imported_files(file, ROOT, launched=False)}
    assert not {f for f in imported if f.startswith("stages/")}, (
        f"{file.name} imports {sorted(imported)}")


def test_library_imports_no_stage() -> None:
    offenders = {f.relative_to(ROOT).as_posix(): sorted(
        g.relative_to(ROOT).as_posix() for g in imported_files(f, ROOT, launched=False)
        if g.relative_to(ROOT).parts[0] == "stages")
        for f in (ROOT / "drkd").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}



def test_distill_reruns_only_for_the_settings_its_method_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The `distill` stage depends on distill_settings' file, not on all of params `distill`:
    another method's weight leaves the file (so distill) as it was, one of DRKD's changes it,
    and a stale file stops the stage before it trains."""
    from conftest import toy_params
    from drkd import cli
    from stages import distill, distill_settings

    stage = STAGES["distill"]
    assert "distill" not in stage["params"]
    assert "models/distill_settings.json" in stage["deps"]
    assert STAGES["distill_settings"]["params"] == ["distill"]
    written = []
    for i, section in enumerate([{}, {"pkd": {"weight": 6.0}}, {"w_ir": 0.5}]):
        params = toy_params(tmp_path / f"p{i}.yaml", distill=section)
        out = tmp_path / f"settings{i}.json"
        assert distill_settings.main(["--params", str(params), "--out", str(out)]) == 0
        written.append(out.read_text())
    assert written[1] == written[0] and written[2] != written[0]
    argv = ["--params", str(tmp_path / "p2.yaml"), "--settings", str(tmp_path / "settings0.json"),
            "--teacher", "t.pt", "--out", str(tmp_path / "s.pt"), "--history", "h.csv",
            "--work-dir", str(tmp_path / "w")]
    assert cli.run(distill.main, argv) == 2
    assert "settings0.json: stale, not the distill settings of" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()
