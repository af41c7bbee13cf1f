"""Every method at the paper's scale, side by side (a benchmark, not a test).

    python -m benchmarks.paper_scale [--arch retinanet faster_rcnn] [--steps 2] [--out F.json]
    python -m benchmarks.paper_scale --methods drkd mgd --steps 8   (those rows only, more steps)
    python -m benchmarks.paper_scale --instances 1 10 50 100 300 [--arch retinanet]
    python -m benchmarks.paper_scale --smoke        (toy sizes, every code path: for the tests)

The paper presets' detectors as they are (presets/paper_<arch>.yaml: R101-FPN256 teacher,
R50-FPN256 student, min/max size 800/1333, batch 2; random weights with the residual branches
at zero (``random_detector``), nothing downloaded) on
BCCD images (640x480, which the detectors resize to 800x1067) with their boxes (without the
shared data folder: random images of that size).

Methods: one train step each, timed in turn (interleaved, one warm-up round, the median of
``--steps``; each timed step right after an untimed one of the same row, ``--settle``, as a
step follows its own kind in training) beside the baseline student's step and the teacher's
backbone forward: DRKD as the paper preset sets it (``release: true``), DRKD as params.yaml
sets it, MGD, CWD, PKD and FGD (their params.yaml sections); ``--methods`` keeps some of them.
Per row: seconds per step, the ratio to the baseline step and to (baseline + teacher forward)
with the quartiles of that ratio over the rounds (one round's timings differ from the next by
several percent), whether every loss stayed finite, the peak memory of one step (a fresh
process each: peak RSS above the imports on a CPU, the allocator's peak on CUDA), and from one
profiled step the forward time of each labelled part (``distill.teacher``, ``distill.method``;
DRKD's ``drkd.pixel`` (GloRe of every level), ``drkd.roi_align``, ``drkd.filter``,
``drkd.relation_matrices``).

--instances: the same images with K random boxes each (K = 1, 10, 50, ...; 8-96 px) and the
instance paths alone, on fixed FPN maps (forward + backward of the method, not the detector,
whose cost does not depend on K): DRKD's INS, its IR with the cosine similarity, the filter and
top-k (the default), its IR with the learned similarity, and FGD's masks; seconds and the peak
memory growth of one call (in this process; the allocator's on CUDA, RSS on a CPU) per K.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.transforms.v2 import functional as F

from benchmarks import cpu_model
from benchmarks.distill_cost import positive_int, quartiles, resident_mib, rounds, timed, train_step
from drkd import cli, registry
from drkd.config import (
    DistillConfig,
    ModelConfig,
    Params,
    load_params,
    merge,
    parse_params,
    read_yaml_file,
    to_dict,
)
from drkd.data.voc import read_annotation, read_split, split_file
from drkd.devices import pick_device
from drkd.distiller import Distiller
from drkd.engine import autocast_dtype
from drkd.files import write_json
from drkd.models import build_detector

REPO = Path(__file__).resolve().parent.parent
BCCD = REPO.parent / "shared" / "data" / "bccd" / "BCCD"
CLASSES = ("RBC", "WBC", "Platelets")
PARTS = ("distill.teacher", "distill.method", "drkd.pixel", "drkd.roi_align", "drkd.filter",
         "drkd.relation_matrices")


def paper_params(arch: str, smoke: bool) -> Params:
    """params.yaml with presets/paper_<arch>.yaml on top, the weights paths cleared (random
    init); --smoke: the same detectors shrunk to toy sizes."""
    raw = merge(to_dict(load_params(REPO / "params.yaml")),
                read_yaml_file(REPO / "presets" / f"paper_{arch}.yaml"))
    for side in ("teacher", "student"):
        raw[side]["model"].update(weights="", backbone_weights="")
        if smoke:
            raw[side]["model"].update(backbone="resnet18", fpn_channels=16, min_size=64,
                                      max_size=96, norm="batch")
    return parse_params(raw)


def bccd_batch(count: int, size: int | None, device: torch.device,
               boxes_per_image: int = 0) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The first ``count`` BCCD training images ([0, 1], optionally resized so the long side is
    ``size``) with their boxes, or ``boxes_per_image`` random ones (8-96 px, seeded). Without
    BCCD (a machine without the shared data folder): random 640x480 images, 12 random boxes."""
    g = torch.Generator().manual_seed(0)
    if BCCD.is_dir():
        names = read_split(split_file(BCCD, "train"))[:count]
        annotations = [read_annotation(BCCD / "Annotations" / f"{n}.xml") for n in names]
        pictures = [F.to_dtype(F.pil_to_tensor(Image.open(BCCD / "JPEGImages" / a.filename)
                                               .convert("RGB")), torch.float32, scale=True)
                    for a in annotations]
    else:
        annotations, pictures = [], [torch.rand(3, 480, 640, generator=g) for _ in range(count)]
        boxes_per_image = boxes_per_image or 12
    images, targets = [], []
    for k, image in enumerate(pictures):
        h, w = image.shape[-2:]
        if boxes_per_image:
            xy = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w - 96, h - 96])
            wh = 8 + torch.rand(boxes_per_image, 2, generator=g) * 88
            boxes = torch.cat([xy, xy + wh], 1)
            labels = torch.randint(1, len(CLASSES) + 1, (boxes_per_image,), generator=g)
        else:
            objects = annotations[k].objects
            boxes = torch.tensor([o.box for o in objects], dtype=torch.float32)
            labels = torch.tensor([CLASSES.index(o.name) + 1 for o in objects])
        if size:
            factor = size / max(h, w)
            image = F.resize(image, [round(h * factor), round(w * factor)], antialias=True)
            boxes = boxes * factor
        images.append(image.to(device))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def random_detector(cfg: ModelConfig, classes: int) -> torch.nn.Module:
    """``build_detector`` with random weights whose residual branches start at zero, as
    torchvision's ``zero_init_residual`` sets them. Under frozen BatchNorm (identity statistics,
    the paper presets' norm) a random ResNet's activations grow block after block: at 320 px the
    R101 teacher's P3 has an RMS of 1.7e4 against the R50 student's 22 (0.085 and 0.07 with
    this init), and the distillation terms' first gradients threw the student's losses to inf or
    NaN within 3 steps for every method but PKD (scale-free). The FLOPs, and so the times, are
    the same."""
    model = build_detector(cfg, classes)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.zero_()
            elif isinstance(block, BasicBlock):
                block.bn2.weight.zero_()
    return model


PEERS = tuple(m for m in registry.names() if m != "drkd")  # every other registered method
ROWS = {"drkd_release": "drkd (paper preset, release)", "drkd": "drkd (params.yaml)",
        **{m: m for m in PEERS}}  # --methods name -> row


def method_configs(paper: Params) -> dict[str, DistillConfig]:
    """The rows: DRKD of the paper preset and of params.yaml, and each peer method."""
    default = load_params(REPO / "params.yaml").distill
    rows = {ROWS["drkd_release"]: paper.distill, ROWS["drkd"]: default}
    rows.update({m: dataclasses.replace(default, method=m) for m in PEERS})
    return rows


def module_for(row: str, student: ModelConfig, teacher: torch.nn.Module, paper: Params,
               classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = random_detector(student, classes)
    return model if row == "none" else Distiller(model, teacher, method_configs(paper)[row])


def parts_ms(step: Any) -> dict[str, float]:
    """Milliseconds of each labelled part's forward in one profiled step (on CUDA: the device
    time of its kernels)."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as prof:
        step()
    # The CPU range of each label: on CUDA its device_time_total is its kernels' time (the GPU
    # annotation of the same name is another entry of key_averages, left out).
    found = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1000
             for e in prof.key_averages()
             if e.key in PARTS and e.device_type == torch.autograd.DeviceType.CPU}
    return {k: round(found[k], 1) for k in PARTS if k in found}


def peak_mib(arch: str, row: str, smoke: bool) -> float:
    """Peak memory of 3 train steps of ``row`` (from the second on, the optimizer's state and
    the last step's gradients are live), in this (fresh) process, above the imports; the
    plain student's without a teacher in memory."""
    device = pick_device()
    imports = resident_mib("VmRSS")
    paper = paper_params(arch, smoke)
    teacher = (random_detector(paper.teacher.model, len(CLASSES) + 1).to(device)
               if row != "none" else torch.nn.Identity())
    module = module_for(row, paper.student.model, teacher, paper, len(CLASSES) + 1).to(device)
    images, targets = bccd_batch(2, 96 if smoke else None, device)
    step = train_step(module, images, targets, paper.student.train)
    for _ in range(3):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resident_mib("VmHWM") - imports


def methods_table(arch: str, steps: int, smoke: bool, memory: bool,
                  only: list[str] | None = None, settle: int = 1) -> dict[str, Any]:
    """The baseline student, the teacher forward and the method rows (``only``: those ROWS)."""
    device = pick_device()
    paper = paper_params(arch, smoke)
    classes = len(CLASSES) + 1
    teacher = random_detector(paper.teacher.model, classes).to(device).eval()
    images, targets = bccd_batch(2, 96 if smoke else None, device)
    kept = {ROWS[name] for name in only or ROWS}
    rows = ["none", *(row for row in method_configs(paper) if row in kept)]
    finite: dict[str, bool] = {}

    def stepper(row: str) -> Any:
        module = module_for(row, paper.student.model, teacher, paper, classes).to(device)
        step = train_step(module, images, targets, paper.student.train)

        def checked() -> None:
            losses = step()
            finite[row] = finite.get(row, True) and all(map(math.isfinite, losses.values()))

        return checked

    steppers = {row: stepper(row) for row in rows}
    transform = random_detector(paper.student.model, classes).transform.eval()
    batch = transform(images)[0].tensors

    amp = autocast_dtype(paper.student.train, device)

    def teacher_forward() -> None:  # as the Distiller runs it: no grad, the student's autocast
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            teacher.backbone(batch)

    times = rounds({**steppers, "teacher forward": teacher_forward}, steps, device, warmup=1,
                   settle=settle)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    base, floor = seconds["none"], seconds["none"] + seconds["teacher forward"]
    floors = [s + f for s, f in zip(times["none"], times["teacher forward"], strict=True)]
    table = {}
    for row in rows:
        q1, q3 = quartiles([t / f for t, f in zip(times[row], floors, strict=True)])
        table[row] = {"s_per_step": seconds[row], "vs_baseline": seconds[row] / base,
                      "vs_baseline_plus_teacher": seconds[row] / floor,
                      "vs_baseline_plus_teacher_q1_q3": [q1, q3],
                      "finite": finite[row], "parts_ms": parts_ms(steppers[row])}
        if memory:
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.paper_scale", "--peak", arch, row,
                 *(["--smoke"] if smoke else [])],
                cwd=REPO, capture_output=True, text=True)
            if child.returncode:  # out of memory, say: that row's peak is unknown, not the rest
                last = (child.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"[paper_scale] {arch} {row}: peak-memory run failed: {last}")
            else:
                table[row]["peak_mib"] = json.loads(child.stdout)
    return {"arch": arch, "batch": list(batch.shape), "teacher_forward_s":
            seconds["teacher forward"], "rows": table}


def method_step(method: torch.nn.Module, s_maps: list[torch.Tensor],
                t_maps: list[torch.Tensor], targets: list[dict[str, Any]],
                shape: tuple[int, ...]) -> bool:
    """One forward + backward of a method's terms on fixed maps; whether every term is
    finite."""
    method.zero_grad(set_to_none=True)
    terms = method(s_maps, t_maps, targets, shape)
    sum(terms.values()).backward()
    return all(bool(torch.isfinite(t)) for t in terms.values())


def peak_growth_mib(call: Any, device: torch.device) -> float:
    """How far one ``call()`` raises this process's peak memory above what it holds before:
    the allocator's on CUDA, the resident set's on a CPU (NaN where Linux's clear_refs is
    missing)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    rss = resident_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    except OSError:  # a kernel or sandbox without it: no memory column
        rss = math.nan
    call()
    return resident_mib("VmHWM") - rss


def instance_scaling(arch: str, counts: list[int], steps: int, smoke: bool) -> dict[str, Any]:
    """Seconds and peak RSS growth of the instance paths' forward + backward against K."""
    device = pick_device()
    paper = paper_params(arch, smoke)
    default = load_params(REPO / "params.yaml").distill
    inst = default.instance
    rows = {
        "drkd INS": dataclasses.replace(default, w_pr=0.0, w_ir=0.0),
        "drkd IR cosine + filter + top-k": dataclasses.replace(default, w_pr=0.0, w_ins=0.0),
        "drkd IR learned": dataclasses.replace(default, w_pr=0.0, w_ins=0.0, instance=(
            dataclasses.replace(inst, similarity="learned", filter=False, topk=0, tau=1.0))),
        "fgd": dataclasses.replace(default, method="fgd"),
    }
    classes = len(CLASSES) + 1
    student = random_detector(paper.student.model, classes).to(device)
    teacher = random_detector(paper.teacher.model, classes).to(device).eval()
    out: dict[str, Any] = {}
    for count in counts:
        images, targets = bccd_batch(2, 96 if smoke else None, device, boxes_per_image=count)
        tensors, targets = student.transform(images, targets)
        with torch.no_grad():
            s_maps = [m.detach() for m in student.backbone(tensors.tensors).values()]
            t_maps = list(teacher.backbone(tensors.tensors).values())
        shape = tuple(tensors.tensors.shape[-2:])
        for name, cfg in rows.items():
            method = Distiller(student, teacher, cfg).method
            assert method is not None
            method.to(device)
            leaves = [m.clone().requires_grad_() for m in s_maps]
            call = functools.partial(method_step, method, leaves, t_maps, targets, shape)
            finite = call()  # and a warm-up
            grown = peak_growth_mib(call, device)
            seconds = timed({name: call}, steps, device, warmup=0)[name]
            out.setdefault(name, {})[count] = {"s": seconds, "peak_growth_mib": grown,
                                               "finite": finite}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["retinanet", "faster_rcnn"],
                        choices=["retinanet", "faster_rcnn"])
    parser.add_argument("--steps", type=positive_int, default=2)
    parser.add_argument("--instances", nargs="+", type=int, metavar="K")
    parser.add_argument("--methods", nargs="+", choices=list(ROWS),
                        help="only these method rows (beside the baseline and the teacher)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peaks")
    parser.add_argument("--settle", type=int, default=1, choices=[0, 1, 2],
                        help="untimed calls of a row right before each of its timed ones "
                        "(0: plain interleaving)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="write the results as JSON too")
    parser.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)  # child: ARCH ROW
    args = parser.parse_args(argv)
    if args.methods and args.instances:
        parser.error("--methods picks rows of the methods table; --instances times the instance "
                     "paths alone")
    if args.peak:
        print(json.dumps(peak_mib(*args.peak, args.smoke)))
        return 0
    device = pick_device()
    cpu = cpu_model()
    print(f"device: {device} ({cpu}), threads: {torch.get_num_threads()}, "
          f"median of {args.steps} steps (settle {args.settle}), images: "
          f"{'BCCD' if BCCD.is_dir() else 'random'}")
    results: dict[str, Any] = {"device": str(device), "cpu": cpu, "settle": args.settle,
                               "threads": torch.get_num_threads(), "steps": args.steps}
    for arch in args.arch:
        if args.instances:
            scaling = instance_scaling(arch, args.instances, args.steps, args.smoke)
            results[f"{arch} instances"] = scaling
            print(f"\n{arch}: instance paths (forward + backward on fixed maps) against boxes "
                  "per image\n\n| path | " + " | ".join(f"K={k}" for k in args.instances)
                  + " |\n|---|" + "---:|" * len(args.instances))
            for name, by_count in scaling.items():
                print(f"| {name} | " + " | ".join(
                    f"{1000 * v['s']:.0f} ms, +{v['peak_growth_mib']:.0f} MiB"
                    + ("" if v["finite"] else ", NOT FINITE") for v in by_count.values()) + " |")
            continue
        table = methods_table(arch, args.steps, args.smoke, not args.no_memory, args.methods,
                              args.settle)
        results[arch] = table
        print(f"\n{arch}: padded batch {table['batch']}, teacher forward "
              f"{table['teacher_forward_s']:.2f} s\n\n| method | s/step | vs baseline | "
              "vs baseline + teacher (quartiles of the rounds) | peak MiB | finite | "
              "forward parts (ms) |\n"
              "|---|---:|---:|---:|---:|---|---|")
        for row, r in table["rows"].items():
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r["parts_ms"].items())
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
            q1, q3 = r["vs_baseline_plus_teacher_q1_q3"]
            print(f"| {row} | {r['s_per_step']:.2f} | {r['vs_baseline']:.2f}x | "
                  f"{r['vs_baseline_plus_teacher']:.2f}x ({q1:.2f}-{q3:.2f}) | {peak} | "
                  f"{'yes' if r['finite'] else 'NO'} | {parts} |")
    if args.out:
        write_json(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
