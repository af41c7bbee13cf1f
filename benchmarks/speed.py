"""Where a training step's time goes on this machine, and what each speed lever buys, measured
side by side in one run (a benchmark, not a test).

    python -m benchmarks.speed [--params params.yaml] [--old-params FILE] [--data data/prepared]
                               [--steps 10] [--compile]

1. Achieved FLOP/s of a student train step (counted by torch.utils.flop_counter) against a
   large fp32 matrix multiply on the same threads (what this CPU attains) and against the
   theoretical peak from the clock and the vector ISA torch detected.
2. Levers on the student step, timed interleaved (A, B, C, A, B, C, ...): bf16 autocast,
   channels_last, the host-synchronisation pattern of the loop (a transfer per loss term vs
   one per step), torch.compile of the backbone (with --compile: compile time, then steps).
3. The data path and threads: a step fed by the PNG loader with 1 worker vs 0 workers vs
   batches already in memory; 1 vs 2 intra-op threads.
4. How a step grows with image size and batch size (for the README's cost model).
5. With --old-params: the teacher, student and distill steps of another params file (e.g. an
   earlier commit's) next to these params', and each stage's projected time (steps x step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.distill_cost import batch, batch_stepper, timed, train_step
from drkd import cli
from drkd.config import DetectorConfig, Params, load_params
from drkd.data.coco import CocoDetection, collate
from drkd.data.transforms import train_transforms
from drkd.distiller import Distiller
from drkd.engine import _loader, make_optimizer, schedule
from drkd.models import build_detector

NUM_CLASSES = 9
CPU = torch.device("cpu")
Step = Callable[[], None]


def detector(section: DetectorConfig, size: int | None = None) -> torch.nn.Module:
    model_cfg = section.model
    if size is not None:
        model_cfg = dataclasses.replace(model_cfg, min_size=size, max_size=size)
    torch.manual_seed(0)
    return build_detector(model_cfg, NUM_CLASSES)


def flops(params: Params) -> None:
    section = params.student
    size, count = section.model.max_size, section.train.batch_size
    images, targets = batch(size, count, CPU)
    model = detector(section)
    counter = FlopCounterMode(display=False)
    with counter:
        sum(model(images, targets).values()).backward()
    step_flop = counter.get_total_flops()
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    step = train_step(model, images, targets, section.train)
    t = timed({"step": step, "gemm": lambda: a @ b}, 5, CPU)
    gemm = 2 * n**3 / t["gemm"]
    achieved = step_flop / t["step"]
    cap = torch.backends.cpu.get_cpu_capability()
    lanes = {"AVX512": 16, "AVX2": 8}.get(cap, 4)  # fp32 lanes per FMA
    ghz = max_ghz()
    # Two FMA pipes per core (2 FLOP each) on the x86 cores this targets.
    peak = torch.get_num_threads() * 2 * 2 * lanes * ghz * 1e9 if ghz else float("nan")
    print(f"\n## FLOP/s ({torch.get_num_threads()} threads, {cap}, {ghz:.2f} GHz max)")
    print(f"student step: {step_flop / 1e9:.1f} GFLOP in {t['step']:.3f} s = "
          f"{achieved / 1e9:.1f} GFLOP/s")
    print(f"fp32 GEMM {n}^3 on the same threads: {gemm / 1e9:.1f} GFLOP/s -> the step runs at "
          f"{achieved / gemm:.0%} of what this CPU attains")
    print(f"theoretical peak ({lanes} fp32 lanes x 2 FMA pipes x 2 FLOP x clock x threads): "
          f"{peak / 1e9:.0f} GFLOP/s -> step {achieved / peak:.0%}, GEMM {gemm / peak:.0%}")


def max_ghz() -> float:
    """The highest clock /proc/cpuinfo reports (0 when unknown)."""
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return max(mhz, default=0.0) / 1000


def report(title: str, times: dict[str, float], base: str) -> None:
    print(f"\n## {title}")
    print("| variant | s/step | vs " + base + " |\n|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.3f} | {times[base] / seconds:.2f}x |")


def levers(params: Params, steps: int, compile_backbone: bool) -> None:
    section = params.student
    images, targets = batch(section.model.max_size, section.train.batch_size, CPU)
    model = detector(section)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fns = {
        "fp32 (default)": train_step(model, images, targets, section.train),
        "bf16 autocast": train_step(copy.deepcopy(model), images, targets, section.train,
                                    torch.bfloat16),
        # Weights in channels_last make every convolution (and its output) channels_last.
        "channels_last": train_step(last, images, targets, section.train),
        "sync per loss term (old loop)": per_term_sync_step(copy.deepcopy(model), section,
                                                            images, targets),
    }
    if compile_backbone:
        compiled = copy.deepcopy(model)
        compiled.backbone.compile()
        start = time.perf_counter()
        fns["torch.compile(backbone)"] = train_step(compiled, images, targets, section.train)
        fns["torch.compile(backbone)"]()
        print(f"\ntorch.compile: first step (compilation) {time.perf_counter() - start:.1f} s")
    report("Levers on the student step (same batch, same init)", timed(fns, steps, CPU),
           "fp32 (default)")


def per_term_sync_step(
    module: torch.nn.Module, section: DetectorConfig, images: list, targets: list
) -> Step:
    """The loop before one-transfer-per-step: isfinite and float() on every term."""
    module.train()
    optimizer = make_optimizer(list(module.parameters()), section.train)

    def step() -> None:
        losses = module(images, targets)
        if not all(bool(torch.isfinite(v)) for v in losses.values()):
            raise RuntimeError("non-finite")
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if section.train.clip_grad_norm > 0:  # as the training loop: 0 is off (a max norm of
            torch.nn.utils.clip_grad_norm_(  # 0 would zero every gradient)
                list(module.parameters()), section.train.clip_grad_norm)
        optimizer.step()
        [float(v.detach()) for v in (*losses.values(), total)]

    return step


def data_path(params: Params, data: Path, steps: int) -> None:
    """A step fed by the real loader (PNG decode, hflip) vs by batches decoded in advance."""
    section = params.student
    dataset = CocoDetection(data / "train.json", train_transforms(section.train.hflip))
    model = detector(section)
    memory = [collate([dataset[i] for i in range(j, j + section.train.batch_size)])
              for j in range(0, steps * section.train.batch_size, section.train.batch_size)]

    train = batch_stepper(model, section.train)

    def fed_by(workers: int) -> Step:
        cfg = dataclasses.replace(section.train, num_workers=workers)
        batches: Iterator[tuple[list, list]] = iter(())

        def step() -> None:
            nonlocal batches
            try:
                images, targets = next(batches)
            except StopIteration:
                batches = iter(_loader(dataset, cfg, 0, 0))
                images, targets = next(batches)
            train(images, targets)

        return step

    cursor = [0]

    def in_memory() -> None:
        train(*memory[cursor[0] % len(memory)])
        cursor[0] += 1

    fns = {"loader, 1 worker (default)": fed_by(1), "loader, 0 workers": fed_by(0),
           "decoded in memory": in_memory}
    report("Data path (real prepared images)", timed(fns, steps, CPU),
           "loader, 1 worker (default)")

    threads = torch.get_num_threads()
    step = train_step(model, *memory[0], section.train)
    times = {}
    for n in sorted({1, threads}, reverse=True):
        torch.set_num_threads(n)
        times[f"{n} intra-op thread(s)"] = timed({"s": step}, steps, CPU)["s"]
    torch.set_num_threads(threads)
    report("Threads", times, f"{threads} intra-op thread(s)")


def scaling(params: Params, steps: int) -> None:
    section = params.student
    size, count = section.model.max_size, section.train.batch_size
    fns = {}
    for s in (size * 3 // 4, size, size * 5 // 4):
        images, targets = batch(s, count, CPU)
        fns[f"{s} px, batch {count}"] = train_step(detector(section, s), images, targets,
                                                      section.train)
    for b in (count // 2, count * 2):
        images, targets = batch(size, b, CPU)
        fns[f"{size} px, batch {b}"] = train_step(detector(section), images, targets,
                                                       section.train)
    report("Student step by image and batch size", timed(fns, steps, CPU),
           f"{size} px, batch {count}")


def stage_steps(params: Params) -> dict[str, int]:
    num = params.data.synthetic.num_train
    return {name: schedule(getattr(params, side).train, num)[1]
            for name, side in (("teacher", "teacher"), ("student", "student"),
                               ("distill", "student"))}


def study_steps(params: Params) -> dict[str, Step]:
    """Teacher, student and distill steps of one params file, on its own image size."""
    def side_batch(section: DetectorConfig) -> tuple[list, list]:
        return batch(section.model.max_size, section.train.batch_size, CPU)

    teacher, student = detector(params.teacher), detector(params.student)
    distiller = Distiller(copy.deepcopy(student), copy.deepcopy(teacher), params.distill)
    return {
        "teacher": train_step(teacher, *side_batch(params.teacher), params.teacher.train),
        "student": train_step(student, *side_batch(params.student), params.student.train),
        "distill": train_step(distiller, *side_batch(params.student), params.student.train),
    }


def compare_studies(old: Params, new: Params, steps: int) -> None:
    fns = {f"{k} ({which})": fn for which, p in (("old", old), ("new", new))
           for k, fn in study_steps(p).items()}
    t = timed(fns, steps, CPU)
    print("\n## The study's training stages: old params vs these (steps x s/step)")
    print("| stage | old steps | old s/step | old min | new steps | new s/step | new min |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    old_steps, new_steps = stage_steps(old), stage_steps(new)
    for stage in ("teacher", "student", "distill"):
        o, n = t[f"{stage} (old)"], t[f"{stage} (new)"]
        om, nm = old_steps[stage] * o / 60, new_steps[stage] * n / 60
        totals[0] += om
        totals[1] += nm
        print(f"| {stage} | {old_steps[stage]} | {o:.3f} | {om:.1f} | {new_steps[stage]} | "
              f"{n:.3f} | {nm:.1f} |")
    print(f"| **training total** | | | **{totals[0]:.1f}** | | | **{totals[1]:.1f}** |")
    print(f"training time ratio old / new: {totals[0] / totals[1]:.2f}x "
          f"(measured side by side; loader and evaluation excluded)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--old-params", help="another params file to compare the stages with")
    parser.add_argument("--data", default="data/prepared", help="prepared data (data path rows)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--only", nargs="*", default=["flops", "levers", "data", "scaling",
                                                       "stages"])
    args = parser.parse_args(argv)
    params = load_params(args.params)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if "flops" in args.only:
        flops(params)
    if "levers" in args.only:
        levers(params, args.steps, args.compile)
    if "data" in args.only and (Path(args.data) / "train.json").is_file():
        data_path(params, Path(args.data), args.steps)
    if "scaling" in args.only:
        scaling(params, args.steps)
    if "stages" in args.only and args.old_params:
        compare_studies(load_params(args.old_params), params, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
