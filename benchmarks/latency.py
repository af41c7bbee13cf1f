"""What a distilled detector costs to run: teacher vs student inference, side by side in one
run (a benchmark, not a test).

    python -m benchmarks.latency [--params params.yaml] [--teacher models/teacher.pt]
        [--students models/student.pt models/student_drkd.pt] [--paper] [--onnx]
        [--min-run-time 2]

For each detector: parameters, forward GFLOP per image (torch.utils.flop_counter), and the
wall time per image of an eval forward (the detector's own resize, normalisation and
post-processing included) at batch 1 and batch 8, timed by torch.utils.benchmark
(``blocked_autorange``: warm-up excluded; median and interquartile range over the blocks), in
PyTorch eager and, with --onnx, in ONNX Runtime (CPU; its export takes one image per call, so
batch 8 is 8 calls). Inputs are the validation images' size (params' `min_size`..`max_size`,
random pixels: what costs time is the size, not the content; a trained checkpoint's detection
count is what post-processing costs, so give trained checkpoints where they exist).
--paper adds the paper preset's detector for params' architecture (presets/paper_<arch>.yaml:
FPN256 at 800x1333) with random weights and an R101, R50 and R18 backbone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import cpu_model
from benchmarks.paper_scale import paper_params
from drkd import cli
from drkd.checkpoint import load_detector
from drkd.config import ModelConfig, load_params
from drkd.models import build_detector, count_parameters

COCO_CLASSES = 81


def images(model_cfg: ModelConfig, count: int) -> list[torch.Tensor]:
    """``count`` random images of the largest size the detector's transform keeps as is."""
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, model_cfg.min_size, model_cfg.max_size, generator=g)
            for _ in range(count)]


def gflop_per_image(model: nn.Module, image: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model([image])
    return counter.get_total_flops() / 1e9


def timed(label: str, sub_label: str, fn: object, per: int, min_run_time: float
          ) -> benchmark.Measurement:
    """A torch.utils.benchmark measurement of ``fn()`` (times per call; ``per`` images a call)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                            description=f"per call of {per} image(s)",
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def row(name: str, model: nn.Module, model_cfg: ModelConfig, use_onnx: bool,
        min_run_time: float) -> dict[str, object]:
    model.eval()
    batch = images(model_cfg, 8)
    out: dict[str, object] = {"model": name, "size": f"{model_cfg.min_size}x{model_cfg.max_size}",
                              "params_M": count_parameters(model) / 1e6,
                              "GFLOP": gflop_per_image(model, batch[0])}
    with torch.no_grad():
        for size in (1, 8):
            m = timed(name, f"batch {size}", lambda n=size: model(batch[:n]), size, min_run_time)
            out[f"torch_b{size}"] = (1000 * m.median / size, 1000 * m.iqr / size)
    if use_onnx:
        import onnxruntime

        from drkd.export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, batch[0], path)
            session = onnxruntime.InferenceSession(str(path),
                                                   providers=["CPUExecutionProvider"])
            arrays = [image.numpy() for image in batch]
            for size in (1, 8):
                def call(n: int = size) -> None:
                    for array in arrays[:n]:
                        session.run(None, {"image": array})
                m = timed(name, f"onnx batch {size}", call, size, min_run_time)
                out[f"onnx_b{size}"] = (1000 * m.median / size, 1000 * m.iqr / size)
    return out


def label(path: str) -> str:
    """A checkpoint's name: its stem, or folder/stem for a compare cell's model.pt."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.stem == "model" else p.stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--students", nargs="*",
                        default=["models/student.pt", "models/student_drkd.pt"])
    parser.add_argument("--paper", action="store_true", help="add the 800x1333 pairs")
    parser.add_argument("--onnx", action="store_true", help="ONNX Runtime too")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    models: list[tuple[str, nn.Module, ModelConfig]] = []
    for name, path, cfg in [("teacher", args.teacher, params.teacher.model),
                            *((label(p), p, params.student.model) for p in args.students)]:
        if Path(path).is_file():
            models.append((name, load_detector(path)[0], cfg))
        else:  # random weights of the params' architecture
            torch.manual_seed(0)
            models.append((f"{name} (random)", build_detector(cfg, 9), cfg))
    if args.paper:
        paper = paper_params(params.teacher.model.arch, smoke=False).teacher.model
        for backbone in ("resnet101", "resnet50", "resnet18"):
            cfg = dataclasses.replace(paper, backbone=backbone)
            torch.manual_seed(0)
            models.append((f"{cfg.arch} {backbone}-FPN256 (random)",
                           build_detector(cfg, COCO_CLASSES), cfg))
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; ms per image: median (IQR)")
    rows = [row(name, model, cfg, args.onnx, args.min_run_time) for name, model, cfg in models]
    columns = ["torch_b1", "torch_b8", *(["onnx_b1", "onnx_b8"] if args.onnx else [])]
    print("| model | input | params (M) | GFLOP/image | "
          + " | ".join(c.replace("_b", " batch ") for c in columns) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(columns))
    for r in rows:
        cells = [f"{r[c][0]:.1f} ({r[c][1]:.1f})" for c in columns]  # type: ignore[index]
        print(f"| {r['model']} | {r['size']} | {r['params_M']:.2f} | {r['GFLOP']:.2f} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
