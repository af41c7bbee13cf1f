"""GPU check: run on a machine with NVIDIA GPUs; prints one table (a short run).

    python -m benchmarks.gpu_check [--params params.yaml] [--steps 10]

For two settings, the embedded default (the models, image size and batch of ``params``) and
the paper's RetinaNet preset (presets/paper_retinanet.yaml: R101-FPN256 teacher, R50-FPN256
student, random weights, 800x1333 inputs, its batch per GPU and its DRKD settings, as
benchmarks.paper_scale builds them), and for fp32, bf16 and fp16 autocast:
student train steps/s, teacher backbone forwards/s, distill steps/s, whether every loss term
stayed finite, and the peak memory of a distill step (``torch.cuda.max_memory_allocated``).
Then the batched-vs-per-image instance-relation speed-up on CUDA, a 2-step distillation
under ``torchrun --nproc_per_node=<all GPUs>`` whose checkpoint rank 0 must write (NCCL with 2
or more GPUs; one GPU is a single process without a process group), and last the tables of
benchmarks.paper_scale (every method at the paper presets' sizes, 3 steps, no per-row memory
processes; the instance paths against the boxes per image) on CUDA.

Without CUDA it stops at once with an error: its numbers mean nothing on a CPU.
``--cpu-smoke`` runs every code path on the CPU at toy sizes; it exists for the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import paper_scale
from benchmarks.distill_cost import relation_speed, timed, train_step
from drkd import cli
from drkd.checkpoint import load_detector
from drkd.config import DistillConfig, ModelConfig, Params, load_params
from drkd.distiller import Distiller
from drkd.models import build_detector

REPO = Path(__file__).resolve().parent.parent
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COCO_CLASSES = 81


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    student: ModelConfig
    teacher: ModelConfig
    distill: DistillConfig
    size: tuple[int, int]  # (H, W) of the input images
    batch_size: int
    num_classes: int
    paper: bool = False  # random R101/R50 weights need paper_scale.random_detector


def settings(params: Params, smoke: bool) -> list[Setting]:
    s, t = params.student.model, params.teacher.model
    if smoke:  # every code path, toy sizes
        # 64x160, not 64x64: no FPN map is 1x1 (P7 is 1x2). On a 1x1 map, CPU bf16 autocast's
        # conv backward (torch 2.14.1) now and then returns NaN weight gradients (P7's conv,
        # ~0.2% of calls on a busy CPU; fp32 and CUDA are not affected, and training on a
        # CPU runs in fp32), which would fail this smoke check at random.
        tiny = dataclasses.replace(s, fpn_channels=16, min_size=64, max_size=160)
        return [Setting("smoke", tiny, tiny, params.distill, (64, 160), 2, 9)]
    default = Setting("default", s, t, params.distill, (s.max_size, s.max_size),
                      params.student.train.batch_size, 9)
    paper = paper_scale.paper_params("retinanet", smoke=False)
    coco = Setting("paper RetinaNet R101->R50", paper.student.model, paper.teacher.model,
                   paper.distill, (paper.student.model.min_size, paper.student.model.max_size),
                   paper.student.train.batch_size, COCO_CLASSES, paper=True)
    return [default, coco]


def detector_batch(
    setting: Setting, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Random images of the setting's size with 6 random boxes each, fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    h, w = setting.size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    images, targets = [], []
    for _ in range(setting.batch_size):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        corners = torch.rand(6, 2, 2, generator=g).sort(dim=1).values  # x1 <= x2, y1 <= y2
        boxes = corners.reshape(6, 4) * 0.9 * scale  # rows (x1, y1, x2, y2)
        boxes[:, 2:] += 0.05 * scale[:2]  # at least 5% of the image wide and high
        targets.append({"boxes": boxes.to(device),
                        "labels": torch.randint(1, setting.num_classes, (6,), generator=g)
                        .to(device)})
    return images, targets


def measure(
    params: Params, setting: Setting, amp: str, steps: int, device: torch.device
) -> dict[str, Any]:
    """Steps/s of student step, teacher forward and distill step; the loss terms that went
    non-finite (the first of each step); peak MiB."""
    torch.manual_seed(0)
    # Random R101/R50 weights: residual branches at zero, or the teacher's maps reach ~1e4
    # (paper_scale.random_detector).
    build = paper_scale.random_detector if setting.paper else build_detector
    teacher = build(setting.teacher, setting.num_classes).to(device).eval()
    # The student on the device first: the Distiller's compatibility probe runs both models.
    distiller = Distiller(build(setting.student, setting.num_classes).to(device), teacher,
                          setting.distill).to(device)
    images, targets = detector_batch(setting, device)
    dtype = AMP[amp]
    not_finite: dict[str, str] = {}  # step name -> "step <n>: <term>=<value>, ...", the first

    def stepper(name: str, module: torch.nn.Module) -> Any:
        step = train_step(module, images, targets, params.student.train, dtype)
        calls = 0

        def checked() -> None:
            nonlocal calls
            calls += 1
            bad = [f"{k}={v}" for k, v in step().items() if not math.isfinite(v)]
            if bad:
                not_finite.setdefault(name, f"step {calls}: {', '.join(bad)}")

        return checked

    # The batch the Distiller gives the teacher: normalised and padded by the transform.
    tensors = distiller.student.transform(images)[0].tensors

    def teacher_forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            teacher.backbone(tensors)

    distill_step = stepper("distill", distiller)
    peak = 0.0
    if device.type == "cuda":
        distill_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        distill_step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    # Built after the peak: a plain student beside the distiller is not what training holds.
    student = build(setting.student, setting.num_classes).to(device).train()
    t = timed(
        {"student": stepper("student", student), "teacher": teacher_forward,
         "distill": distill_step},
        steps,
        device,
    )
    return {
        "student": 1 / t["student"],
        "teacher": 1 / t["teacher"],
        "distill": 1 / t["distill"],
        "ratio": t["distill"] / (t["student"] + t["teacher"]),
        "not_finite": not_finite,
        "peak_mib": peak,
    }


def torchrun_distill(params_file: str, gpus: int, smoke: bool) -> str:
    """2-step distillation under torchrun on every GPU; returns what rank 0 wrote."""
    raw = yaml.safe_load(Path(params_file).read_text())
    raw["data"] = {
        "source": "synthetic",
        "synthetic": {**raw["data"]["synthetic"], "num_train": 32 * gpus, "num_val": 8},
    }
    if smoke:
        raw["data"]["synthetic"].update(image_size=64, min_object_size=8, max_object_size=40)
    for side in ("teacher", "student"):
        raw[side]["train"].update(max_steps=2, batch_size=2, num_workers=0, warmup_steps=1)
        if smoke:
            raw[side]["model"].update(fpn_channels=16, min_size=64, max_size=64)
    raw["tracking"]["enabled"] = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        common = ["--params", str(work / "params.yaml"), "--data", str(work / "data")]

        def run(*cmd: str) -> None:
            subprocess.run(cmd, cwd=REPO, check=True)

        run(sys.executable, "-m", "stages.prepare", "--params", str(work / "params.yaml"),
            "--out", str(work / "data"))
        run(sys.executable, "-m", "stages.train", "teacher", *common, "--out",
            str(work / "teacher.pt"), "--history", str(work / "t.csv"), "--work-dir",
            str(work / "wt"))
        # --cpu-smoke: gpus is 1, one process on the CPU (gloo), the same code path.
        run(sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
            "-m", "stages.distill", "--teacher", str(work / "teacher.pt"),
            *common, "--out", str(work / "student.pt"), "--history", str(work / "s.csv"),
            "--work-dir", str(work / "ws"))
        model, _ = load_detector(work / "student.pt")  # rank 0 wrote a loadable detector
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (tests)")
    args = parser.parse_args(argv)
    # Each line as it is printed: a run stopped at its time limit keeps what it measured.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.cpu_smoke:  # on a GPU machine too: the stages and ranks it starts use the CPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("error: gpu_check needs CUDA: torch.cuda.is_available() is False on this machine",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    params = load_params(args.params)
    gpus = torch.cuda.device_count()
    name = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"device: {name} x {max(gpus, 1)}   torch {torch.__version__}")
    print("| setting | amp | student steps/s | teacher fwd/s | distill steps/s "
          "| distill / (student + teacher) | all losses finite | peak MiB (distill) |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    failed = []
    for setting in settings(params, args.cpu_smoke):
        for amp in AMP:
            r = measure(params, setting, amp, args.steps, device)
            failed += [f"{setting.name} {amp} {name} {bad}"
                       for name, bad in r["not_finite"].items()]
            print(f"| {setting.name} | {amp} | {r['student']:.2f} | {r['teacher']:.2f} | "
                  f"{r['distill']:.2f} | {r['ratio']:.2f} | {'NO' if r['not_finite'] else 'yes'} | "
                  f"{r['peak_mib']:.0f} |", flush=True)
    speed = relation_speed(args.params, args.steps, rounds=1 if args.cpu_smoke else 5,
                           device=device)
    print(f"instance relations, batched vs per-image loop: {speed['speedup']:.2f}x "
          f"(range {speed['speedup_min']:.2f}-{speed['speedup_max']:.2f})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    wrote = torchrun_distill(args.params, max(gpus, 1), args.cpu_smoke)
    group = ("1 process, no process group" if max(gpus, 1) == 1 else
             "gloo" if args.cpu_smoke else "nccl")
    print(f"torchrun x {max(gpus, 1)} ({group}), 2 distill steps: rank 0 wrote the student "
          f"({wrote})")
    # The CPU benchmark's own configurations (docs/speed.md), so the two tables line up; last,
    # as the longest part. Peak memory: the table above has the allocator's for the paper
    # RetinaNet setting (a fresh process per row here would cost minutes of device time).
    smoke = ["--smoke", "--steps", "1", "--arch", "retinanet"] if args.cpu_smoke else []
    paper_scale.main(smoke or ["--steps", "3", "--no-memory"])
    paper_scale.main([*smoke, "--instances", *(["1", "12"] if smoke else
                                               ["1", "10", "50", "100", "300"])])
    if failed:
        print(f"error: a loss term was not finite: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
