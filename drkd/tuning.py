"""The Optuna study behind `make tune` (stages/tune.py keeps the command line): the search
space of each method, the objective (the validation AP of a student distilled for the short
`tune` budget), the shared study in an RDB with its worker gate, and the outputs
(best_params.yaml, trials.csv, plots). The one module that imports optuna.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import optuna
import sqlalchemy
import torch
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from drkd import registry
from drkd.config import (
    ConfigError,
    NonFiniteLoss,
    Params,
    TrainConfig,
    UserError,
    load_params,
    merge,
    parse_params,
    to_dict,
)
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms, train_transforms
from drkd.devices import pick_device, thread_share
from drkd.distiller import Distiller, load_teacher
from drkd.engine import fit, schedule
from drkd.evaluation import coco_metrics, predict
from drkd.files import require_files, sqlite_lock_file, write_text
from drkd.models import build_detector
from drkd.params_file import promote
from drkd.plots import save_figure
from drkd.recipe import shorten
from drkd.report import NOT_LOSSES
from drkd.tracking import StageRun, open_experiment, parent_run

DEFAULT_STORAGE = "sqlite:///optuna.db"
PLOTS: dict[str, Callable[..., Any]] = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values,
}



def space_of(params: Params, method: str) -> Any:
    """The search space of ``method``: DRKD's is `tune.space`, the others' `tune.spaces.<m>`."""
    return params.tune.space if method == "drkd" else params.tune.spaces[method]


def space_key(method: str) -> str:
    """Where ``space_of`` reads ``method``'s space in params, for error lines."""
    return "tune.space" if method == "drkd" else f"tune.spaces.{method}"


def float_dims(space: Any) -> set[str]:
    """The float dimensions of a space: there, [low, high] is a log range (else choices)."""
    hints = typing.get_type_hints(type(space))
    return {name for name, tp in hints.items() if tp == tuple[float, ...]}


def distributions(space: Any) -> dict[str, FloatDistribution | CategoricalDistribution]:
    """Optuna's distribution of every searched dimension of ``space`` ([] dims are off): a
    float dimension's [low, high] is a log range, anything else a list of choices."""
    floats = float_dims(space)
    out: dict[str, FloatDistribution | CategoricalDistribution] = {}
    for field in dataclasses.fields(space):
        choices = getattr(space, field.name)
        if field.name in floats and len(choices) == 2:
            out[field.name] = FloatDistribution(choices[0], choices[1], log=True)
        elif choices:
            out[field.name] = CategoricalDistribution(list(choices))
    return out


def suggest(trial: optuna.Trial, space: Any) -> dict[str, Any]:
    """One value per dimension of ``space`` ([] dims are left out: their params value holds)."""
    values: dict[str, Any] = {}
    for name, dist in distributions(space).items():
        if isinstance(dist, FloatDistribution):
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=True)
        else:
            values[name] = trial.suggest_categorical(name, list(dist.choices))
    return values


def check_resumable(study: optuna.Study, space: Any, where: str) -> None:
    """Refuse to continue a study whose trials drew a dimension from choices (or a scale) the
    space no longer has: Optuna would fail every new trial at its first suggestion. A float
    range may widen or narrow between runs."""
    current = distributions(space)
    for trial in study.get_trials(deepcopy=False):
        for name, stored in trial.distributions.items():
            if name not in current:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(stored, current[name])
            except ValueError:
                raise UserError(
                    f"{where}.{name}: {current[name]} differs from the {stored} that study "
                    f"'{study.study_name}' drew trial {trial.number} from; continue it with the "
                    "old space, or start a new study (tune.study_name or --storage)") from None


def partial_params(values: dict[str, Any], method: str = "drkd") -> dict[str, Any]:
    """Suggested values as a partial params file, each where ``method``'s registration puts
    it (e.g. DRKD's w_ir -> distill.w_ir, its tau -> distill.instance.tau, lr -> the student's;
    MGD's weight -> distill.mgd.weight)."""
    out: dict[str, Any] = {}
    for dim, value in values.items():
        *parents, key = registry.METHODS[method].path(dim).split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[key] = value
    return out


def value_of(params: Params, method: str, name: str) -> Any:
    """The params file's value of search dimension ``name`` of ``method``."""
    value: Any = params
    for key in registry.METHODS[method].path(name).split("."):
        value = getattr(value, key)
    return value


def current_values(params: Params, method: str = "drkd") -> dict[str, Any]:
    """The params file's own value of every searched dimension that lies inside the space:
    enqueued as trial 0, so the study measures the defaults at the same budget."""
    values: dict[str, Any] = {}
    for name, dist in distributions(space_of(params, method)).items():
        value = value_of(params, method, name)
        if isinstance(dist, FloatDistribution):
            inside = dist.low <= value <= dist.high
        else:
            inside = value in dist.choices
        if inside:
            values[name] = value
    return values


def calibrate(params: Params, method: str, teacher: nn.Module, train: CocoDetection,
              steps: int, work_dir: Path) -> list[dict[str, Any]]:
    """Each loss term of ``method`` against the student's detection loss over the first
    ``steps`` training steps at the params file's values (the student recipe, seeded as a trial
    starts). Per term: its weight's search dimension and value, the mean ratio term / detection,
    the weight range that puts the term between 0.1x and 10x the detection loss (terms are
    linear in their weights) and the space's range."""
    cfg = dataclasses.replace(shorten(params.student.train, 1, steps), log_every=1)
    torch.manual_seed(params.seed)
    student = build_detector(params.student.model, train.num_classes)
    method_params = dataclasses.replace(params.distill, method=method)  # type: ignore[arg-type]
    history = fit(Distiller(student, teacher, method_params), train, cfg, seed=params.seed,
                  work_dir=work_dir, desc=f"calibrate {method}")
    not_detection = {*NOT_LOSSES, *registry.loss_terms()}
    space = space_of(params, method)
    rows = []
    for term, dim in registry.METHODS[method].terms.items():
        if not dim:  # unweighted (DRKD's loss_filter trains its filter alone)
            continue
        ratios = [row[term] / sum(v for k, v in row.items() if k not in not_detection)
                  for row in history if term in row]
        if not ratios:
            continue
        weight, ratio = value_of(params, method, dim), statistics.mean(ratios)
        suggested = (weight * 0.1 / ratio, weight * 10 / ratio) if ratio > 0 else None
        searched = tuple(getattr(space, dim))
        rows.append({"term": term, "dimension": dim, "weight": weight, "ratio": ratio,
                     "suggested": suggested, "space": searched,
                     "covers": bool(suggested and len(searched) == 2
                                    and searched[0] <= suggested[0]
                                    and suggested[1] <= searched[1])})
    return rows


def check_space(params: Params, method: str) -> None:
    """The budget override and every choice and range end of ``method``'s space must give valid
    params: a study whose trials the strict loader refuses would spend its budget on failures."""
    trial_params(params, {}, method)
    where = space_key(method)
    space = space_of(params, method)
    for field in dataclasses.fields(space):
        for value in getattr(space, field.name):
            try:
                trial_params(params, {field.name: value}, method)
            except ConfigError as err:
                raise ConfigError(f"{where}.{field.name}: {value!r} is not a valid value "
                                  f"({err})") from None


def trial_params(params: Params, values: dict[str, Any], method: str = "drkd",
                 num_images: int = 0) -> Params:
    """``params`` with ``method`` and its suggested values applied and the student's recipe
    compressed to `tune`'s budget (``shorten``; ``num_images``, the training images, lets a
    `tune.max_steps` cap count in the share)."""
    partial = merge(partial_params(values, method), {"distill": {"method": method}})
    applied = parse_params(merge(to_dict(params), partial))
    train = shorten(applied.student.train, params.tune.epochs, params.tune.max_steps, num_images)
    return dataclasses.replace(applied, student=dataclasses.replace(applied.student, train=train))


def evaluate_ap(model: nn.Module, val: CocoDetection, batch_size: int) -> float:
    detections, _ = predict(model, val, batch_size, pick_device(), progress=False)
    return float(coco_metrics(val.annotation_file, detections)["AP"])


def last_epoch(cfg: TrainConfig, num_images: int) -> int:
    """Index of the last epoch that ``fit`` runs with ``cfg`` in one process."""
    per_epoch, total = schedule(cfg, num_images)
    return math.ceil(total / per_epoch) - 1


def distill_and_evaluate(
    params: Params,
    teacher: nn.Module,
    train: CocoDetection,
    val: CocoDetection,
    work_dir: Path,
    on_ap: Callable[[int, float, bool], None],
    desc: str,
) -> float:
    """Distil a fresh student (seeded init) for the short budget; ``on_ap(epoch, AP, final)``
    after each epoch."""
    final = last_epoch(params.student.train, len(train))
    torch.manual_seed(params.seed)
    student = build_detector(params.student.model, train.num_classes)
    distiller = Distiller(student, teacher, params.distill)
    last = math.nan

    def on_epoch(epoch: int, _: nn.Module) -> None:
        nonlocal last
        last = evaluate_ap(student, val, params.evaluate.batch_size)
        on_ap(epoch, last, epoch == final)

    fit(
        distiller,
        train,
        params.student.train,
        seed=params.seed,
        work_dir=work_dir,
        desc=desc,
        on_epoch=on_epoch,
    )
    return last


def make_objective(
    params: Params,
    teacher: nn.Module,
    train: CocoDetection,
    val: CocoDetection,
    track: StageRun,
    method: str = "drkd",
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("threads", torch.get_num_threads())
        track.start_trial(trial.number)
        state, reason, start = "FAIL", "", time.perf_counter()

        def on_ap(epoch: int, ap: float, final: bool) -> None:
            track.log_metrics({"epoch_AP": ap}, step=epoch)
            # Optuna's step is the epochs done (the pruners' resource): with the 0-based
            # index, Hyperband's first rung (1) fell on the last of 2 epochs, never pruned.
            trial.report(ap, epoch + 1)
            # A trial that has run its whole budget is complete: pruning it now would save
            # nothing and would hide its final AP from the sampler.
            if not final and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: AP {ap:.4f}")

        try:
            values = suggest(trial, space_of(params, method))  # fails if the space changed
            track.log_params(values)
            with tempfile.TemporaryDirectory(prefix=f"drkd-tune-{trial.number}-") as work:
                ap = distill_and_evaluate(
                    trial_params(params, values, method, len(train)),
                    teacher,
                    train,
                    val,
                    Path(work),
                    on_ap,
                    desc=f"trial {trial.number}",
                )
            if not math.isfinite(ap):
                raise ValueError(f"validation AP is {ap}")
            track.log_metrics({"AP": ap})
            state = "COMPLETE"
            return ap
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except NonFiniteLoss as err:
            # Diverged: a bad outcome, not a broken trial. TPE learns only from complete and
            # pruned trials, so as FAIL the diverging region would stay attractive and keep
            # using up the budget; pruned, it ranks below every complete trial.
            state, reason = "PRUNED", f"diverged: {type(err).__name__}: {err}".splitlines()[0]
            trial.set_user_attr("fail_reason", reason)
            raise optuna.TrialPruned(reason) from None
        except BaseException as err:  # any bug, or Ctrl-C: FAIL with the reason
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            trial.set_user_attr("fail_reason", reason)
            if isinstance(err, KeyboardInterrupt | SystemExit):  # stopped, not failed: rerun
                trial.set_user_attr("interrupted", True)
            raise
        finally:
            track.end_trial(state, time.perf_counter() - start, reason)

    return objective


def trial_ap(t: FrozenTrial) -> float | None:
    """The objective value, or a pruned trial's last reported AP."""
    if t.value is not None:
        return t.value
    return t.intermediate_values[t.last_step] if t.last_step is not None else None


def seconds(t: FrozenTrial) -> float | None:
    return t.duration.total_seconds() if t.duration else None


def cut_short(t: FrozenTrial) -> bool:
    """A trial that did not run its course: its worker died (failed for its missing heartbeat,
    no reason recorded) or was stopped (Ctrl-C, SIGTERM through ``run_workers``). It does not
    count against the budget, and its values run again."""
    return t.state == TrialState.FAIL and (
        bool(t.user_attrs.get("interrupted")) or "fail_reason" not in t.user_attrs)


def fail_reason(t: FrozenTrial) -> str:
    """Why a trial failed, or that a pruned one diverged; "" otherwise."""
    unrecorded = "no heartbeat: its worker died" if t.state == TrialState.FAIL else ""
    return str(t.user_attrs.get("fail_reason", unrecorded))


def progress(study: optuna.Study, t: FrozenTrial) -> None:
    ap, took = trial_ap(t), seconds(t)
    shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in t.params.items()}
    line = (
        f"[tune] trial {t.number} {t.state.name:8} AP={'-' if ap is None else f'{ap:.4f}'} "
        f"{took or 0:.1f}s {shown}"
    )
    if fail_reason(t):
        line += f" ({fail_reason(t)})"
    try:
        best = study.best_trial
        line += f" | best: trial {best.number} AP={best.value:.4f}"
    except ValueError:  # no complete trial yet
        pass
    print(line, flush=True)


def at_the_edge(trial: FrozenTrial, space: Any = None, margin: float = 0.05) -> list[str]:
    """The dimensions where ``trial`` sits at the edge of ``space`` (default: the space it was
    drawn from; a study resumed in a widened space judges its old best by the new one), one
    line each: a float within ``margin`` of its range's floor or ceiling (on the log scale for
    a log range), or the smallest or largest of positive numeric choices (0 reads as "off" in
    these spaces: topk 0 keeps every pair, so a list with 0 is not ordered by its numbers). A
    best trial there says the space may be cutting off the method's working regime: widen it
    and run more trials."""
    spaces = {**trial.distributions,
              **(distributions(space) if space is not None else {})}
    lines = []
    for name, value in trial.params.items():
        dist = spaces[name]
        if isinstance(dist, FloatDistribution) and dist.high > dist.low:  # [a, a]: no edge
            scale: Callable[[float], float] = math.log if dist.log else float
            where = (scale(value) - scale(dist.low)) / (scale(dist.high) - scale(dist.low))
            edge = "floor" if where < margin else "ceiling" if where > 1 - margin else ""
            if edge:
                lines.append(f"{name} {value:.3g} at the {edge} of [{dist.low:g}, {dist.high:g}]")
        elif isinstance(dist, CategoricalDistribution) and len(dist.choices) > 2 and all(
                isinstance(c, int | float) and not isinstance(c, bool) and c > 0
                for c in dist.choices):
            numbers = [float(typing.cast(float, c)) for c in dist.choices]
            ends = {min(numbers): "smallest", max(numbers): "largest"}
            if value in ends:
                lines.append(f"{name} {value:g}: the {ends[value]} of {list(dist.choices)}")
    return lines


def write_outputs(study: optuna.Study, out: Path, track: StageRun, method: str = "drkd",
                  space: Any = None) -> None:
    """best_params.yaml, trials.csv and the plots, from every trial in the storage (``space``:
    the current one, for the edge check)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]

    def csv_text() -> str:
        """Optuna's own trial table, finished trials only, with the AP (a pruned trial's last
        reported one), seconds, worker and fail reason in front of the params."""
        table = study.trials_dataframe(attrs=("number", "state", "params"))
        by_number = {t.number: t for t in trials}
        table = table[table["number"].isin(list(by_number))]
        ap = [trial_ap(by_number[n]) for n in table["number"]]
        table.insert(2, "AP", ["" if v is None else f"{v:.6g}" for v in ap])
        took = [seconds(by_number[n]) for n in table["number"]]
        table.insert(3, "duration_s", ["" if v is None else f"{v:.2f}" for v in took])
        table.insert(4, "worker", [by_number[n].user_attrs.get("worker", "")
                                   for n in table["number"]])
        table.insert(5, "fail_reason", [fail_reason(by_number[n]) for n in table["number"]])
        table = table.rename(columns=lambda c: c.replace("params_", "param_", 1))
        return str(table.to_csv(index=False))

    written = [out / "trials.csv"]
    write_text(csv_text(), written[0])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        header = (
            f"# Best of Optuna study '{study.study_name}': trial {best.number}, validation "
            f"AP {best.value:.4f} ({len(complete)} complete of {len(trials)} trials).\n"
            "# Promote: python -m stages.tune --promote [--method M] [--row NAME] [--apply]\n"
        )
        edges = at_the_edge(best, space)
        if edges:
            header += "".join(f"# At the edge of the space: {line}\n" for line in edges)
            print(f"[tune] the best trial sits at the edge of the space ({'; '.join(edges)}): "
                  "widen tune.space(s) and run more trials")
        body = yaml.safe_dump(partial_params(best.params, method), sort_keys=False)
        write_text(header + body, out / "best_params.yaml")
        written.append(out / "best_params.yaml")
        track.log_metrics({"best_AP": float(best.value or 0.0)})
        print(f"[tune] best: trial {best.number} AP={best.value:.4f} -> {out / 'best_params.yaml'}")
    else:  # an earlier study's file there would be promoted as this one's
        (out / "best_params.yaml").unlink(missing_ok=True)
        print("[tune] no complete trial yet: no best_params.yaml")
    track.log_metrics(
        {
            s.name.lower(): float(sum(t.state == s for t in trials))
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
    )

    import matplotlib.pyplot as plt  # optuna draws with pyplot (Agg without a display)

    for name, plot in PLOTS.items():
        if name == "param_importances" and len(complete) < 2:
            print(f"[tune] {name}.png skipped: needs 2 complete trials, have {len(complete)}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-study warnings
                figure = plot(study).figure
            save_figure(figure, out / f"{name}.png")
            written.append(out / f"{name}.png")
        except Exception as err:  # a plot must not cost the study's results
            print(f"[tune] {name}.png skipped: {type(err).__name__}: {err}")
        finally:
            plt.close("all")
    for path in written:
        track.log_artifact(path)


def study_name(params: Params, method: str) -> str:
    """`tune.study_name` for DRKD; `<study_name>-<method>` for another method (its own
    search space: never mixed into DRKD's study)."""
    return params.tune.study_name if method == "drkd" else f"{params.tune.study_name}-{method}"


def open_study(params: Params, url: str, method: str = "drkd") -> optuna.Study:
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, grace_period=params.tune.grace_s,
                heartbeat_interval=max(1, params.tune.grace_s // 6))
    except Exception as err:  # bad URL, unreachable server: one line
        raise UserError(f"storage {url}: {type(err).__name__}: {err}") from None
    tune = params.tune
    pruners: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(1, max(tune.epochs, 2)),
        "none": optuna.pruners.NopPruner,
    }
    return optuna.create_study(
        storage=storage,
        study_name=study_name(params, method),
        direction="maximize",
        pruner=pruners[tune.pruner](),
        load_if_exists=True,
    )


class Gate:
    """Makes "count the trials, then create one" a single step for all workers of a storage, so
    that the study ends with exactly n_trials that ran their course: an flock on <db>.lock for a
    sqlite file, a session advisory lock on PostgreSQL; both are released if the worker dies.
    Other server RDBs get no lock: two workers that count at the same moment may then each add a
    trial."""

    POSTGRES_KEY = 0x6472_6B64  # "drkd": one advisory lock key for every study

    def __init__(self, url: str) -> None:
        self.path = sqlite_lock_file(url)
        self.handle: IO[str] | None = None
        self.engine = sqlalchemy.create_engine(url) if url.startswith("postgresql") else None
        self.connection: sqlalchemy.Connection | None = None

    def acquire(self) -> None:
        if self.path is not None:
            self.handle = self.path.open("a")
            fcntl.flock(self.handle, fcntl.LOCK_EX)  # released by the OS if this worker dies
        elif self.engine is not None:
            # Outside a transaction (no session idles in one while it waits or holds), and
            # with the server probing the socket: a worker whose machine dies while it holds
            # the lock loses it in about a minute, not at the OS's 2-hour keepalive.
            self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            for setting in ("tcp_keepalives_idle = 30", "tcp_keepalives_interval = 10",
                            "tcp_keepalives_count = 3"):
                self.connection.execute(sqlalchemy.text(f"SET {setting}"))
            self.connection.execute(
                sqlalchemy.text(f"SELECT pg_advisory_lock({self.POSTGRES_KEY})"))

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
        if self.connection is not None:
            self.connection.execute(
                sqlalchemy.text(f"SELECT pg_advisory_unlock({self.POSTGRES_KEY})"))
            self.connection.close()
            self.connection = None


def run_study(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    seed: int,
    gate: Gate,
    poll_s: float = 10.0,
) -> None:
    """Trials until the study holds ``n_trials`` that ran their course (complete, pruned, or
    failed with an error; all workers), none still running. A trial cut short (``cut_short``)
    does not count and is queued again with its values: a killed worker costs its trial's time,
    not a place in the budget (nor the params.yaml trial). A worker with nothing left to start
    waits for the running trials (``poll_s``): one whose worker died fails after
    tune.grace_s, and the waiting worker runs it again."""

    def gated(trial: optuna.Trial) -> float:
        gate.release()  # the trial exists (and counts) now: let other workers count
        return objective(trial)

    while True:
        gate.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
                requeue_cut_short(study)
            trials = study.get_trials(deepcopy=False)
            taken = [t for t in trials if t.state != TrialState.WAITING and not cut_short(t)]
            if len(taken) >= n_trials:
                if not any(t.state == TrialState.RUNNING for t in taken):
                    return
            else:
                # Seeded by how far the study is: reproducible from the same storage state, and
                # resumed or parallel workers do not replay each other's suggestions.
                study.sampler = optuna.samplers.TPESampler(seed=seed + len(taken))
                study.optimize(gated, n_trials=1, catch=(Exception,), callbacks=[progress])
                continue
        finally:
            gate.release()
        time.sleep(poll_s)


def requeue_cut_short(study: optuna.Study) -> None:
    """Queue every trial cut short (``cut_short``) once more with its values (an enqueued
    trial's fixed ones too, should it have died before drawing them), tagged ``retry_of``; call
    it under the gate, so that two workers do not queue one twice."""
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if cut_short(t) and t.number not in queued:
            values = {**t.system_attrs.get("fixed_params", {}), **t.params}
            tags = {k: v for k, v in t.user_attrs.items() if k == "from"}
            study.enqueue_trial(values, user_attrs={**tags, "retry_of": t.number},
                                skip_if_exists=False)


def study_dir(out: Path, method: str) -> Path:
    """Where the study of ``method`` writes: OUT for DRKD (the pipeline's own method), else
    OUT/<method>."""
    return out if method == "drkd" else out / method


def tuned_method(params: Params, given: str) -> str:
    """The method a study tunes: ``given`` (--method), else tune.method, else distill.method."""
    method = given or params.tune.method or params.distill.method
    if method == "none":
        raise UserError("tune: distill.method is none; pick a method (--method or tune.method)")
    return method


def tune(params_file: str, method: str, data: Path, teacher_path: Path, storage: str,
         n_trials: int, out: Path) -> None:
    """Run (or continue) the study of ``method`` (``tuned_method``) until ``n_trials`` (0:
    tune.n_trials) trials have run their course over all workers; write OUT (OUT/<method> for a
    method other than DRKD)."""
    params = load_params(params_file)
    method = tuned_method(params, method)
    check_space(params, method)
    out = study_dir(out, method)
    if not teacher_path.is_file():
        raise UserError(f"{teacher_path}: teacher checkpoint not found (dvc repro train_teacher)")
    if not (data / "train.json").is_file():
        raise UserError(f"{data / 'train.json'}: not found (dvc repro prepare)")
    train = CocoDetection(data / "train.json", train_transforms(params.student.train.hflip))
    val = CocoDetection(data / "val.json", eval_transforms())
    teacher = load_teacher(teacher_path, train)
    url = storage or params.tune.storage or DEFAULT_STORAGE
    n_trials = n_trials or params.tune.n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # a missing driver, an unreachable server: one line, as open_study says it
        gate = Gate(url)
        gate.acquire()  # two workers creating a fresh sqlite file would race on its tables
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise UserError(f"storage {url}: {type(err).__name__}: {err}".splitlines()[0]) from None
    try:
        study = open_study(params, url, method)
        check_resumable(study, space_of(params, method), space_key(method))
        if not study.trials:
            study.enqueue_trial(current_values(params, method), user_attrs={"from": "params.yaml"})
    finally:
        gate.release()
    print(
        f"[tune] study '{study.study_name}' in {url}: {len(study.trials)} trials so far, "
        f"budget {n_trials}"
    )
    with parent_run(params, study.study_name, url, n_trials, data) as track:
        objective = make_objective(params, teacher, train, val, track, method)
        run_study(study, objective, n_trials, params.tune.sampler_seed, gate,
                  poll_s=max(1, params.tune.grace_s // 6))
        write_outputs(study, out, track, method, space_of(params, method))


def promote_best(params_file: str, method: str, out: Path, row: str, apply_it: bool) -> None:
    """``--promote``: the best values of the study of ``method`` (``tuned_method``) from its
    OUT folder, as a `dvc exp run` line, into params (``apply_it``) or as compare row ``row``
    (drkd.params_file.promote)."""
    params = load_params(params_file)
    method = tuned_method(params, method)
    promote(params_file, params, method, study_dir(out, method) / "best_params.yaml", row,
            apply_it, study_name(params, method))


def print_calibration(params_file: str, method: str, data: Path, teacher_path: Path,
                      steps: int) -> None:
    """Print each loss term of the method against the detection loss over the first
    ``steps`` steps (``calibrate``), and whether its search range contains the weights that
    put it between 0.1x and 10x the detection loss."""
    params = load_params(params_file)
    method = tuned_method(params, method)
    require_files([data / "train.json", teacher_path])
    train = CocoDetection(data / "train.json", train_transforms(params.student.train.hflip))
    teacher = load_teacher(teacher_path, train)
    with tempfile.TemporaryDirectory() as work:
        rows = calibrate(params, method, teacher, train, steps, Path(work))
    print(f"{method}: each term / the detection loss, mean over steps 1-{steps}\n")
    print("| term | weight | value | term / detection | weight for 0.1x..10x | space | covers |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        low, high = r["suggested"] or (float("nan"), float("nan"))
        space = "..".join(f"{v:.3g}" for v in r["space"]) if r["space"] else "off"
        print(f"| {r['term']} | {r['dimension']} | {r['weight']:.3g} | {r['ratio']:.3g} | "
              f"{low:.3g}..{high:.3g} | {space} | {'yes' if r['covers'] else 'NO'} |")


def run_workers(argv: list[str], workers: int) -> None:
    """``workers`` processes of ``python -m stages.tune argv`` on this machine, sharing one
    study, each with its share of the cores (``OMP_NUM_THREADS``, unless it is set already);
    waits for all, and fails when one fails. Ctrl-C or SIGTERM stops them all (SIGINT each,
    then SIGKILL a worker that has not ended 30 s later)."""
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(thread_share(workers)))
    params = load_params(argv[argv.index("--params") + 1])
    if params.tracking.enabled:  # a new store's tables are made once, here, not by N at once
        open_experiment(params.tracking)
    print(f"[tune] {workers} workers, {env['OMP_NUM_THREADS']} thread(s) each")
    children: list[subprocess.Popen[bytes]] = []
    stopped: list[bool] = []

    def stop(*_: Any) -> None:  # as Ctrl-C: each worker records its running trial as failed
        stopped.append(True)  # and none starts after this
        for child in children:
            child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    previous = signal.signal(signal.SIGTERM, stop)  # before any worker starts: none orphaned
    try:
        for _ in range(workers):
            if not stopped:
                children.append(subprocess.Popen([sys.executable, "-m", "stages.tune", *argv],
                                                 env=env))
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:
        stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(codes):  # a worker killed by signal N exits as a shell reports it: 128 + N
        raise SystemExit(max(128 - c if c < 0 else c for c in codes))
