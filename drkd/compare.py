"""`make compare`'s cells (see stages/compare.py): each row's resolved `distill` settings, one
cell's params, training and evaluation, launched as the main pipeline launches them."""

from __future__ import annotations

import csv
import hashlib
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from drkd.config import (
    DistillConfig,
    TrainConfig,
    UserError,
    from_dict,
    load_params,
    method_distill,
    parse_params,
    row_distill,
    to_dict,
)
from drkd.files import require_files, require_fresh, write_json, write_text
from drkd.recipe import shorten
from drkd.tracking import stage_run

STATS = ("AP", "AP50", "APs", "APm", "APl")  # logged to the cell's MLflow run


def resolved_rows(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Row name -> the `distill` settings its cells train with: params.yaml's `distill` with the
    row's overrides, every value in its canonical type (0 and 0.0 are one setting), only the
    keys the row's method reads."""
    return {
        name: method_distill(to_dict(from_dict(
            DistillConfig, row_distill(params["distill"], name, overrides), "distill")))
        for name, overrides in params["compare"]["methods"].items()
    }


def require_rows(params_file: str, rows: Any, wanted: list[str]) -> None:
    """One line naming the first of ``wanted`` that ``rows`` (compare.methods) does not have."""
    unknown = [row for row in wanted if row not in rows]
    if unknown:
        raise UserError(f"{params_file}: compare.methods has no row {unknown[0]!r} "
                        f"(rows: {', '.join(rows)})")


def cell_params(params_file: str, row: str, seed: int) -> dict[str, Any]:
    """params.yaml as one cell trains it: its seed and its row's `distill` (``resolved_rows``;
    the keys its method does not read take their defaults); its own tracking off (the cell is
    the MLflow run)."""
    params = to_dict(load_params(params_file))
    rows = params["compare"]["methods"]
    require_rows(params_file, rows, [row])
    params["seed"] = seed
    params["distill"] = resolved_rows(params)[row]
    # Its own row alone: the others' overrides would be checked on top of this row's `distill`
    # (a row that adds `plus` methods would make the `none` row invalid).
    params["compare"]["methods"] = {row: rows[row]}
    epochs = params["compare"]["epochs"]
    if epochs:
        recipe = from_dict(TrainConfig, params["student"]["train"], "student.train")
        train = to_dict(shorten(recipe, epochs, recipe.max_steps))
        params["student"]["train"] = train
    params["tracking"]["enabled"] = False
    parse_params(params)
    return params


def compare_id(params: dict[str, Any], data: Path, teacher: Path) -> str:
    """What every cell of one comparison shares (not the method, its params or the seed)."""
    digest = hashlib.md5((data / "train.json").read_bytes())
    digest.update(teacher.read_bytes())
    # The launcher too: its process count divides the steps (one batch per process).
    digest.update(json.dumps([params["student"], params["compare"]["epochs"],
                              params["launcher"]], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def launch(launcher: str, stage: str, argv: list[str]) -> None:
    """``<launcher> -m <stage> argv``, as dvc.yaml runs the training stages (torchrun: DDP); the
    launcher's ``python`` is this interpreter, the one DVC found on the PATH. A SIGTERM to the
    cell (a DVC queue kill) reaches the training too; a failed training ends the cell with its
    exit code (1: diverged, 2: bad input), after its own error line."""
    command = shlex.split(launcher)
    if command[0] == "python":
        command[0] = sys.executable
    # The handler goes in before the child starts: a SIGTERM while it starts is passed on as
    # soon as there is a child to pass it to, never lost (nor killing the cell without it).
    child: subprocess.Popen[bytes] | None = None
    received: list[int] = []

    def forward(signum: int, _: object) -> None:
        received.append(signum)
        if child is not None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        child = subprocess.Popen([*command, "-m", stage, *argv])
        for signum in received:
            child.send_signal(signum)
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        print(f"error: {stage} under `{launcher}` {how}", file=sys.stderr)
        raise SystemExit(max(code, 1))


def trains_drkd_modules(distill: dict[str, Any]) -> bool:
    """Whether a row's resolved ``distill`` trains DRKD's modules (as its method or in
    ``plus``): its cell then saves them, so what the relation filter learned is measurable
    (benchmarks/relation_filter.py)."""
    return "drkd" in (distill["method"], *distill.get("plus", []))


def run_cell(params_file: str, row: str, seed: int, out: Path, data: Path, teacher: Path,
             row_file: Path | None = None) -> None:
    """Train and evaluate row ``row`` at ``seed`` into ``out`` (the files the stage's docstring
    lists); ``row_file``, the cell's DVC dependency, must hold what the cell trains with."""
    params = cell_params(params_file, row, seed)
    if row_file:
        require_fresh(row_file, params["distill"], f"not row {row!r} of {params_file} "
                      "(run `dvc repro compare/dvc.yaml:rows` first)")
    require_files([data / "train.json", data / "val.json", teacher])
    method = params["distill"]["method"]
    cell_id = compare_id(params, data, teacher)
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(params, indent=1) + "\n", out / "params.yaml")  # JSON is YAML
    common = ["--params", str(out / "params.yaml"), "--data", str(data)]
    work = Path("work/compare") / out.name
    train = [*common, "--out", str(out / "model.pt"),
             "--history", str(out / "history.csv"), "--work-dir", str(work)]
    user = load_params(params_file)  # the params file as given: its tracking and launcher
    tags = {"row": row, "method": method, "seed": str(seed), "compare_id": cell_id}
    # Named as DVC names the matrix stage (`dvc repro compare/dvc.yaml:cell@ROW-SEED`).
    with stage_run(user.tracking, f"cell@{row}-{seed}", params, data) as run:
        run.set_tags(tags)
        if method == "none":
            launch(user.launcher, "stages.train", ["student", *train])
        else:
            modules = (["--modules-out", str(out / "modules.pt")]
                       if trains_drkd_modules(params["distill"]) else [])
            launch(user.launcher, "stages.distill",
                   [*train, "--teacher", str(teacher), *modules])
        with (out / "history.csv").open() as fh:
            history = list(csv.DictReader(fh))
        if not history:  # e.g. student.train.epochs 0, which keeps given weights
            raise UserError(f"{out / 'history.csv'}: the cell trained no step "
                            "(student.train.epochs is 0 and compare.epochs does not set one)")
        # The step loops' time, summed over a killed run's parts, and the training's peak
        # memory over those parts (rank 0's under DDP), as drkd.engine.fit records them.
        steps, seconds = int(history[-1]["step"]), float(history[-1]["seconds"])
        # And the threads it took (rank 0's): cells run side by side should each take their
        # share of the cores, and CPU results can differ in the last bits between counts.
        cost = {"train_seconds": round(seconds, 2), "steps": steps,
                "seconds_per_step": seconds / steps,
                "peak_memory_mb": max(float(row["peak_memory_mb"]) for row in history),
                "threads": int(float(history[-1]["threads"]))}
        launch("python", "stages.evaluate",
               ["compare", *common, "--checkpoint", str(out / "model.pt"),
                "--metrics", str(out / "metrics.json"),
                "--detections", str(out / "detections.json")])
        metrics = json.loads((out / "metrics.json").read_text())
        overrides = params["compare"]["methods"][row]
        write_json({**cost, **tags, "overrides": overrides}, out / "cost.json")
        run.log_metrics({**{k: metrics[k] for k in STATS},
                         **{k: float(v) for k, v in cost.items()}})
        run.log_artifact(out / "history.csv")


def write_rows(params_file: str, out: Path) -> None:
    """ROW.json per row of ``compare.methods``: its resolved `distill` settings."""
    for name, distill in resolved_rows(to_dict(load_params(params_file))).items():
        write_json(distill, out / f"{name}.json")


