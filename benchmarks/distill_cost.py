"""What DRKD costs, measured side by side in one run (a benchmark, not a test).

    python -m benchmarks.distill_cost [--params params.yaml] [--steps 20]
    python -m benchmarks.distill_cost --methods none mimic drkd pkd cwd mgd fgd [--out F.json]
    python -m benchmarks.distill_cost --params docs/one-teacher-2026-12-06/params.yaml \
        --rows none drkd mgd_tuned mgd_tuned_pr [--out F.json]

Prints, on the params file's models and image shape (min_size x max_size, random images, 6
boxes each):
1. step-time ratio  distill step / (baseline student step + teacher backbone forward)
   (target <= 1.10: only the DRKD modules' forward, backward and optimizer work may be added);
2. batched instance relations vs a per-image loop like the release's, forward + backward,
   4 images x 10 instances at 256 px (no target on CPU; measured on CUDA by gpu_check.py);
3. peak memory of a distill step vs a student step, each in a fresh process: on CPU the peak
   resident memory (VmHWM) minus the resident memory after the imports, i.e. models, optimizer
   state and activations without the ~1.3 GiB of torch libraries; on CUDA max_memory_allocated.
With --methods: the train step of each method (its Distiller with the teacher's forward; none =
the plain student), timed in turn in one run, as a ratio to the plain student step: the
side-by-side cost the leaderboard of `make compare` cannot give (its cells run hours apart);
``--out`` writes it as JSON for ``stages.leaderboard --step-times``. With --rows: the same for
rows of params.yaml's ``compare.methods``, each with its cells' own `distill` settings (a tuned
row, a combination row), keyed by row name.
Optimizers come from the training loop (drkd.engine.make_optimizer), as in real training.
Every timed call follows an untimed one of its own kind (``--settle 1``), as steps follow each
other in training; ``--settle 0`` interleaves plainly (the tables dated before 2026-12-07).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import cpu_model
from drkd import cli
from drkd.compare import require_rows, resolved_rows
from drkd.config import (
    DistillConfig,
    Params,
    TrainConfig,
    UserError,
    from_dict,
    load_params,
    method_names,
    to_dict,
)
from drkd.devices import pick_device
from drkd.distiller import Distiller
from drkd.engine import autocast_dtype, make_optimizer, module_device
from drkd.engine import train_step as engine_step
from drkd.files import write_json
from drkd.models import build_detector
from drkd.modules.relation import InstanceRelation, RelationFilter, pad_instances, relation_matrix

NUM_CLASSES = 9
RELATION_ROUNDS = 5


def batch(size: int | tuple[int, int], count: int, device: torch.device
          ) -> tuple[list[torch.Tensor], list[dict]]:
    """``count`` random images of ``size`` (a side, or (height, width)) with 6 boxes each."""
    height, width = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(count)]
    extent = torch.tensor([width, height])
    targets = []
    for _ in range(count):
        xy = torch.rand(6, 2, generator=g) * extent * 0.7
        wh = 8 + torch.rand(6, 2, generator=g) * extent * 0.25
        boxes = torch.min(torch.cat([xy, xy + wh], 1), extent.repeat(2) - 1)
        targets.append({"boxes": boxes.to(device),
                        "labels": torch.randint(1, NUM_CLASSES, (6,), generator=g).to(device)})
    return images, targets


def image_shape(params: Params) -> tuple[int, int]:
    """(min_size, max_size): the largest landscape image the student's transform keeps as it
    is (BCCD's 256x192 for its preset; the embedded 128 px square)."""
    return params.student.model.min_size, params.student.model.max_size


def timed(fns: dict[str, Callable[[], None]], steps: int, device: torch.device,
          warmup: int = 3, settle: int = 0) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (A, B, C, A, B, C, ...) after
    ``warmup`` rounds, so that a slow spell of the machine hits every function alike
    (``settle``: see ``rounds``)."""
    return {name: statistics.median(t)
            for name, t in rounds(fns, steps, device, warmup, settle).items()}


def rounds(fns: dict[str, Callable[[], None]], steps: int, device: torch.device,
           warmup: int = 3, settle: int = 0) -> dict[str, list[float]]:
    """Seconds of every call of each function, ``steps`` interleaved rounds (see ``timed``);
    with ``settle``, that many untimed calls of a function right before each timed one, so the
    timed call follows one of its own kind, as in training (at the paper's size a step right
    after another model's step is slower, most for the step with the most memory:
    docs/speed.md).

    A plain clock, not torch.utils.benchmark.Timer: its ``timeit`` makes two untimed calls
    before every timed block, which would triple each round of train steps."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (one value: itself twice)."""
    if len(values) == 1:
        return values[0], values[0]
    # "inclusive": quartiles within the values ("exclusive", the default, extrapolates past
    # them for 2 values and gives the min and max for 3).
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return int(text)


def models(params_file: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    params = load_params(params_file)
    torch.manual_seed(0)
    student = build_detector(params.student.model, NUM_CLASSES).to(device)
    teacher = build_detector(params.teacher.model, NUM_CLASSES).to(device)
    return student, teacher


AS_TRAINED = "as trained"  # the autocast dtype training uses: train.amp on CUDA, fp32 on a CPU


def batch_stepper(
    module: torch.nn.Module, cfg: TrainConfig, amp: torch.dtype | None | str = AS_TRAINED
) -> Callable[[list, list], dict[str, float]]:
    """The training loop's own step (drkd.engine.train_step: clipping, one transfer) with one
    optimizer kept across calls, on the batch it is given; ``amp``: an autocast dtype, None
    for fp32, or as training runs it."""
    module.train()
    if amp == AS_TRAINED:
        amp = autocast_dtype(cfg, module_device(module))
    assert amp is None or isinstance(amp, torch.dtype)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], cfg)
    scaler = torch.amp.GradScaler(module_device(module).type, enabled=amp == torch.float16)

    def step(images: list, targets: list) -> dict[str, float]:
        """Returns each loss term and ``loss``, their total (one transfer, as in training)."""
        names, terms = engine_step(module, images, targets, optimizer, scaler, cfg, amp)
        return dict(zip(names, terms.tolist(), strict=True))

    return step


def train_step(
    module: torch.nn.Module, images: list, targets: list, cfg: TrainConfig,
    amp: torch.dtype | None | str = AS_TRAINED,
) -> Callable[[], dict[str, float]]:
    """The same on one fixed batch."""
    step = batch_stepper(module, cfg, amp)
    return lambda: step(images, targets)


def step_ratio(params_file: str, steps: int, settle: int = 1) -> dict[str, float]:
    device = pick_device()
    params = load_params(params_file)
    student, teacher = models(params_file, device)
    images, targets = batch(image_shape(params), params.student.train.batch_size, device)
    teacher.eval()
    tensors = torch.stack(images)
    amp = autocast_dtype(params.student.train, device)

    def teacher_forward() -> None:  # as the Distiller runs it: no grad, the student's autocast
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            teacher.backbone(tensors)

    # The distiller trains its own copy of the student (same init), so the two steps are
    # timed on identical networks.
    distiller = Distiller(copy.deepcopy(student), teacher, params.distill).to(device)
    r = rounds(
        {
            "student": train_step(student, images, targets, params.student.train),
            "teacher": teacher_forward,
            "distill": train_step(distiller, images, targets, params.student.train),
        },
        steps,
        device,
        settle=settle,
    )
    t = {name: statistics.median(seconds) for name, seconds in r.items()}
    # This machine's step time wanders by several percent from one round to the next: the
    # quartiles of the per-round ratio say how far the ratio of the medians can be trusted.
    per_round = [d / (s + f) for d, s, f in zip(r["distill"], r["student"], r["teacher"],
                                                 strict=True)]
    low, high = quartiles(per_round)
    return {"student_step_s": t["student"], "teacher_forward_s": t["teacher"],
            "distill_step_s": t["distill"],
            "ratio": t["distill"] / (t["student"] + t["teacher"]),
            "ratio_q1": low, "ratio_q3": high, "ratio_round_median": statistics.median(per_round)}


def method_steps(params_file: str, settings: dict[str, DistillConfig], steps: int,
                 settle: int = 1) -> dict[str, float]:
    """Median seconds per train step under each name's `distill` settings (method none: the
    plain student), interleaved; every Distiller wraps its own copy of one student init, so all
    steps train identical networks on the same batch."""
    device = pick_device()
    params = load_params(params_file)
    student, teacher = models(params_file, device)  # the Distiller puts the teacher in eval
    images, targets = batch(image_shape(params), params.student.train.batch_size, device)
    fns = {}
    for name, distill in settings.items():
        module = copy.deepcopy(student)
        if distill.method != "none":
            module = Distiller(module, teacher, distill).to(device)
        fns[name] = train_step(module, images, targets, params.student.train)
    return timed(fns, steps, device, settle=settle)


def method_settings(params_file: str, methods: list[str]) -> dict[str, DistillConfig]:
    """Each method with params.yaml's `distill` settings."""
    distill = load_params(params_file).distill
    return {method: dataclasses.replace(distill, method=method) for method in methods}


def row_settings(params_file: str, rows: list[str]) -> dict[str, DistillConfig]:
    """Each row of ``compare.methods`` with the `distill` settings its cells train with."""
    resolved = resolved_rows(to_dict(load_params(params_file)))
    require_rows(params_file, resolved, rows)
    return {row: from_dict(DistillConfig, resolved[row], "distill") for row in rows}


def relation_speed(
    params_file: str, steps: int, rounds: int = RELATION_ROUNDS, device: torch.device | None = None
) -> dict[str, float]:
    """Batched vs per-image instance relations (RoIAlign features of a 256 px, 256-ch P2), with
    the similarity, target, embedding, filter, tau and topk of ``params_file``.

    Gradients are reset before each call, as in training. The two versions are timed side by
    side in ``rounds`` rounds; the speed-up is the median round's (the spread is printed, since
    one round on a shared machine can be far off)."""
    device = device or pick_device()
    inst = load_params(params_file).distill.instance
    images, per_image, dim = 4, 10, 256 * 9
    torch.manual_seed(0)
    # The configured path: theta/phi only for the learned similarity, g/W only when L_IR
    # matches refined features (target features | both); the matrix target times R itself.
    refine = inst.target != "matrix"
    block = InstanceRelation(dim, inst.embed_dim, refine=refine,
                             learned=inst.similarity == "learned").to(device)
    filt = RelationFilter(dim, inst.filter_hidden).to(device)
    e_all = torch.randn(images * per_image, dim, device=device, requires_grad=True)
    index = torch.arange(images, device=device).repeat_interleave(per_image)
    tensors = [e_all, *block.parameters(), *filt.parameters()]

    def reset_grads() -> None:  # as zero_grad(set_to_none=True) in training
        for t in tensors:
            t.grad = None

    def weights(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        return filt(e, mask) if inst.filter else None

    def batched() -> None:
        reset_grads()
        e, mask = pad_instances(e_all, index, images)
        r = relation_matrix(block.affinity(e), mask, inst.tau, inst.topk, weights(e, mask))
        (block.refine(e, r) if refine else r).square().sum().backward()

    def looped() -> None:  # the release: one image at a time
        reset_grads()
        total = e_all.new_zeros(())
        for i in range(images):
            e = e_all[index == i][None]
            mask = torch.ones(1, e.shape[1], dtype=torch.bool, device=device)
            r = relation_matrix(block.affinity(e), mask, inst.tau, inst.topk, weights(e, mask))
            total = total + (block.refine(e, r) if refine else r).square().sum()
        total.backward()

    runs = [timed({"batched": batched, "looped": looped}, steps, device) for _ in range(rounds)]
    speedups = sorted(r["looped"] / r["batched"] for r in runs)
    return {"batched_s": statistics.median(r["batched"] for r in runs),
            "looped_s": statistics.median(r["looped"] for r in runs),
            "speedup": statistics.median(speedups), "speedup_min": speedups[0],
            "speedup_max": speedups[-1]}


def resident_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, from /proc (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(params_file: str, distill: bool) -> float:
    """MiB at the peak of 3 train steps, measured in this (fresh) process, above the
    footprint of the imports."""
    device = pick_device()
    imports = resident_mib("VmRSS") if device.type == "cpu" else 0.0
    params = load_params(params_file)
    if distill:
        student, teacher = models(params_file, device)
        module: torch.nn.Module = Distiller(student, teacher, params.distill)
    else:  # the plain student's peak without a teacher in memory
        torch.manual_seed(0)
        module = build_detector(params.student.model, NUM_CLASSES)
    module.to(device)
    images, targets = batch(image_shape(params), params.student.train.batch_size, device)
    step = train_step(module, images, targets, params.student.train)
    for _ in range(3):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resident_mib("VmHWM") - imports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=positive_int, default=20)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--methods", nargs="+", metavar="METHOD", choices=method_names("none"),
                       help="only time these methods' train steps side by side (none: plain)")
    which.add_argument("--rows", nargs="+", metavar="ROW",
                       help="the same for these rows of compare.methods, as their cells train")
    parser.add_argument("--out", help="with --methods/--rows: also write the seconds per step "
                        "as JSON")
    parser.add_argument("--settle", type=int, default=1, choices=[0, 1, 2],
                        help="untimed calls of a step right before each timed one, so it follows "
                        "its own kind as in training (0: plain interleaving)")
    parser.add_argument("--memory", choices=["student", "distill"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:  # child process of the memory comparison
        print(json.dumps(peak_memory(args.params, args.memory == "distill")))
        return 0
    if args.methods or args.rows:
        try:
            settings = (method_settings(args.params, args.methods) if args.methods
                        else row_settings(args.params, args.rows))
        except UserError as error:
            parser.exit(2, f"error: {error}\n")
        times = method_steps(args.params, settings, args.steps, args.settle)
        base = next((times[n] for n, d in settings.items() if d.method == "none"), None)
        print(f"device: {pick_device()}  threads: {torch.get_num_threads()}  "
              f"steps: {args.steps} per method, interleaved, settle {args.settle}")
        print(f"| {'method' if args.methods else 'row'} | s/step | vs plain student |\n"
              "|---|---:|---:|")
        for method, seconds in times.items():
            ratio = f"{seconds / base:.2f}x" if base else "-"
            print(f"| {method} | {seconds:.4g} | {ratio} |")
        if args.out:
            write_json({"seconds_per_step": times, "device": str(pick_device()),
                        "cpu": cpu_model(), "settle": args.settle,
                        "threads": torch.get_num_threads(), "steps": args.steps,
                        "date": datetime.date.today().isoformat(),
                        "command": shlex.join(["python", "-m", "benchmarks.distill_cost",
                                               *sys.argv[1:]])}, args.out)
        return 0
    if load_params(args.params).distill.method == "none":
        raise SystemExit(f"{args.params}: distill.method is 'none'; nothing to measure")
    ratio = step_ratio(args.params, args.steps, args.settle)
    speed = relation_speed(args.params, args.steps)
    # A fresh process per peak, run as the package's module from the repository root.
    mem = {kind: json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.distill_cost", "--params",
         str(Path(args.params).resolve()), "--memory", kind],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        check=True).stdout) for kind in ("student", "distill")}
    print(f"device: {pick_device()}  threads: {torch.get_num_threads()}  settle: {args.settle}")
    print(f"student step {ratio['student_step_s']:.3f} s + teacher forward "
          f"{ratio['teacher_forward_s']:.3f} s; distill step {ratio['distill_step_s']:.3f} s")
    print(f"step-time ratio distill / (student + teacher forward): {ratio['ratio']:.3f} "
          f"(target <= 1.10); the {args.steps} rounds' ratios: median "
          f"{ratio['ratio_round_median']:.3f}, quartiles "
          f"{ratio['ratio_q1']:.3f}-{ratio['ratio_q3']:.3f}")
    print(f"instance relations, 4 images x 10 instances, fwd+bwd: batched "
          f"{1000 * speed['batched_s']:.2f} ms, per-image loop {1000 * speed['looped_s']:.2f} ms, "
          f"speed-up {speed['speedup']:.2f}x (median of {RELATION_ROUNDS} rounds, range "
          f"{speed['speedup_min']:.2f}-{speed['speedup_max']:.2f})")
    print(f"peak memory: student step {mem['student']:.0f} MiB, distill step "
          f"{mem['distill']:.0f} MiB, ratio {mem['distill'] / mem['student']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
