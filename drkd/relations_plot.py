"""Relation plots like the paper's: what the trained DRKD modules see on validation images.

``plot_relations(teacher, distilled, modules, val_json, num_images, out_dir)`` rebuilds the
Distiller from the teacher checkpoint, the distilled student checkpoint (a plain detector)
and the training-only modules file (``Distiller.modules_checkpoint()``), runs the first
``num_images`` validation images once, and writes:

- ``pixel_relations.png``: per image, a query point at the centre of its largest GT box and
  the pixel relations of that query on the finest FPN level, for the teacher (``glore_t[0]``)
  and the student (``glore_s[0]``): relation(q, p) = sum_n B[n, q] B[n, p], with B the GloRe
  projection onto the graph nodes (N x HW), normalised to [0, 1]. Without GloRe modules (w_pr
  = 0, or a method without a DRKD part) a placeholder saying why.
- ``glore_drift.json``: per FPN level, ||GloRe(F) - F|| / ||F|| on those images for the
  teacher's and the student's units: how far the pixel-relation target has moved away from
  plain feature imitation (0 for a fresh unit of ours). Not written without GloRe modules.
- ``instance_relations.png``: per image with >= 2 instances, the relation matrices R_t and
  R_s of the finest instance level, exactly as L_IR computes them
  (``Distiller.relation_matrices``), on one colour scale. Without instance relation modules
  a placeholder saying why. DRKD counts as a part of a combination (``plus: [drkd]``) too.

Boxes and queries are in the coordinates of the detector's transformed (resized) batch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import torch
from matplotlib.patches import Rectangle
from torch.nn import functional as nnf

from drkd.checkpoint import load, load_detector
from drkd.config import ConfigError, DistillConfig, UserError, from_dict
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.distiller import Distiller
from drkd.files import write_json
from drkd.methods.drkd import DRKD, drkd_part, instances
from drkd.modules.glore import GloRe
from drkd.plots import placeholder, save_figure, subplots
from drkd.taps import part

PIXEL_PNG, INSTANCE_PNG = "pixel_relations.png", "instance_relations.png"
DRIFT_JSON = "glore_drift.json"


def load_distiller(
    teacher: str | Path, distilled: str | Path, modules: str | Path
) -> tuple[Distiller, list[str]]:
    """Distiller(distilled student, teacher, the modules' config) with the trained modules
    loaded, in eval mode; plus the category names (label - 1 -> name)."""
    student, student_state = load_detector(distilled)
    teacher_model, _ = load_detector(teacher)
    state = load(modules)
    if not isinstance(state.get("modules"), dict) or not isinstance(
        state.get("distill_config"), dict
    ):
        raise UserError(
            f"{modules}: not a DRKD modules checkpoint (needs 'modules' and 'distill_config')"
        )
    try:
        cfg = from_dict(DistillConfig, state["distill_config"], "distill_config")
    except ConfigError as err:
        raise UserError(f"{modules}: {err}") from None
    # The distilled student as trained: not restarted from the teacher's neck and head.
    distiller = Distiller(student, teacher_model, dataclasses.replace(cfg, init_student=False))
    try:
        result = distiller.load_state_dict(state["modules"], strict=False)
    except RuntimeError as err:  # shape mismatch: modules trained for other detectors
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"{modules}: modules do not fit these detectors ({first})") from None
    missing = [k for k in result.missing_keys if not k.startswith(("student.", "teacher."))]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{modules}: modules do not match its distill_config: "
            f"missing {_some(missing)}; unexpected {_some(result.unexpected_keys)}"
        )
    names = [str(n) for n in student_state.get("category_names", [])]
    return distiller.eval(), names


def _some(keys: list[str], shown: int = 4) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return (", ".join(keys[:shown]) or "none") + more


def pixel_relation(glore: GloRe, feature: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
    """feature (C, h, w), query (row, col) -> (h, w) relation(q, p) = sum_n B[n, q] B[n, p],
    min-max normalised to [0, 1]."""
    h, w = feature.shape[-2:]
    proj = glore.node_projection(feature[None].float().flatten(2))[0]  # (N, hw)
    relation = proj[:, query[0] * w + query[1]] @ proj  # (hw,)
    relation = relation - relation.min()
    return (relation / relation.max().clamp(min=1e-12)).view(h, w)


@torch.no_grad()
def glore_drift(units: list[GloRe], maps: list[torch.Tensor]) -> list[float]:
    """Per level: ||GloRe(F) - F|| / ||F|| over the batch, maps (B, C, H, W); the unit's
    relational part relative to the features it is added to."""
    drift = []
    for unit, feature in zip(units, maps, strict=False):
        feature = feature.float()
        drift.append(float((unit(feature) - feature).norm() / feature.norm().clamp(min=1e-12)))
    return drift


def _largest_box_centre(boxes: torch.Tensor, size: tuple[int, int]) -> tuple[float, float, int]:
    """(y, x) of the largest box's centre and its index; the image centre (index -1) if none."""
    if len(boxes) == 0:
        return size[0] / 2, size[1] / 2, -1
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    i = int(area.argmax())
    x0, y0, x1, y1 = boxes[i].tolist()
    return (y0 + y1) / 2, (x0 + x1) / 2, i


def _run(
    distiller: Distiller, dataset: CocoDetection, count: int
) -> tuple[
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[torch.Tensor],
    list[dict[str, Any]],
    tuple[int, int],
]:
    """One eval forward of the student (captured) and the teacher backbone on its batch ->
    (student maps, teacher maps, RGB pictures (h, w, 3) in [0, 1], boxes, targets, padded hw)."""
    device = next(distiller.student.parameters()).device
    items = [dataset[i] for i in range(count)]
    images = [im.as_subclass(torch.Tensor).to(device) for im, _ in items]
    targets = [
        {"boxes": t["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4).to(device)}
        for _, t in items
    ]
    # The detector's own transform: the batch and boxes exactly as training sees them.
    with torch.no_grad():
        image_list, scaled = part(distiller.student, "transform")(images, targets)
        batch = image_list.tensors
        student_maps = list(part(distiller.student, "backbone")(batch).values())
        teacher_maps = list(part(distiller.teacher, "backbone")(batch).values())
    transform = part(distiller.student, "transform")
    mean = torch.tensor(cast(list[float], transform.image_mean), device=device)[:, None, None]
    std = torch.tensor(cast(list[float], transform.image_std), device=device)[:, None, None]
    pictures = []
    for i in range(len(images)):
        h, w = image_list.image_sizes[i]
        pictures.append((batch[i, :, :h, :w] * std + mean).clamp(0, 1).permute(1, 2, 0).cpu())
    return (
        student_maps,
        teacher_maps,
        pictures,
        [t["boxes"].cpu() for t in scaled],
        [t for _, t in items],
        (batch.shape[-2], batch.shape[-1]),
    )


def _name(label: int, names: list[str]) -> str:
    return names[label - 1] if 0 < label <= len(names) else str(label)


def plot_pixel_relations(
    distiller: Distiller,
    student_maps: list[torch.Tensor],
    teacher_maps: list[torch.Tensor],
    pictures: list[torch.Tensor],
    boxes: list[torch.Tensor],
    targets: list[dict[str, Any]],
    padded: tuple[int, int],
    names: list[str],
    path: Path,
) -> None:
    """Rows = images; columns = image + query, teacher relations, student relations."""
    method = cast(DRKD, drkd_part(distiller.method))
    sides = [
        ("teacher: GloRe_t[0]", method.glore_t[0], teacher_maps[0]),
        ("student: GloRe_s[0]", method.glore_s[0], student_maps[0]),
    ]
    fig, axes = subplots(
        len(pictures), 3, figsize=(9.5, 3.2 * len(pictures)), squeeze=False, layout="constrained"
    )
    heat = None
    for row, (picture, box) in enumerate(zip(pictures, boxes, strict=True)):
        h, w = picture.shape[:2]
        cy, cx, which = _largest_box_centre(box, (h, w))
        fh, fw = student_maps[0].shape[-2:]
        stride_y, stride_x = padded[0] / fh, padded[1] / fw
        valid_h, valid_w = math.ceil(h / stride_y), math.ceil(w / stride_x)  # cells over the image
        query = (min(int(cy / stride_y), valid_h - 1), min(int(cx / stride_x), valid_w - 1))
        label = (
            "image centre (no GT)"
            if which < 0
            else (f"query: {_name(int(targets[row]['labels'][which]), names)} centre")
        )
        ax = axes[row][0]
        ax.imshow(picture.numpy())
        for x0, y0, x1, y1 in box.tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
        ax.set_title(f"image {int(targets[row]['image_id'])}\n{label}", fontsize=9)
        for col, (title, glore, maps) in enumerate(sides, start=1):
            feature = maps[row, :, :valid_h, :valid_w]
            relation = pixel_relation(cast(GloRe, glore), feature, query)
            up = nnf.interpolate(
                relation[None, None],
                scale_factor=(stride_y, stride_x),
                mode="bilinear",
                align_corners=False,
            )[0, 0, :h, :w]
            ax = axes[row][col]
            ax.imshow(picture.numpy())
            heat = ax.imshow(up.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
        for ax in axes[row]:
            ax.plot(cx, cy, marker="x", color="white", markersize=10, mew=3)
            ax.plot(cx, cy, marker="x", color="black", markersize=8, mew=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
    if heat is not None:
        bar = fig.colorbar(heat, ax=axes[:, 1:], shrink=0.6, label="relation to the query (0-1)")
        if bar.solids is not None:  # opaque scale, though the overlay is half transparent
            bar.solids.set_alpha(1)
    fig.suptitle("Pixel relations of a query point, finest FPN level")
    save_figure(fig, path)


def plot_instance_relations(
    distiller: Distiller,
    student_maps: list[torch.Tensor],
    teacher_maps: list[torch.Tensor],
    pictures: list[torch.Tensor],
    boxes: list[torch.Tensor],
    targets: list[dict[str, Any]],
    padded: tuple[int, int],
    names: list[str],
    path: Path,
) -> int:
    """Rows = images with >= 2 instances; columns = numbered boxes, R_t, R_s. Returns the
    number of rows drawn (a placeholder PNG when 0)."""
    device = student_maps[0].device
    method = cast(DRKD, drkd_part(distiller.method))
    on_device = [{"boxes": b.to(device), "labels": t["labels"].to(device)}
                 for b, t in zip(boxes, targets, strict=True)]
    r_s, r_t, mask = method.relation_matrices(student_maps, teacher_maps, on_device, padded, 0)
    rows = []
    for i, box in enumerate(boxes):
        keep = instances(box)
        n = int(mask[i].sum())
        if n != len(keep):
            raise RuntimeError(f"image {i}: {n} instances in the mask, {len(keep)} boxes")
        if n >= 2:
            labels = [int(v) for v in targets[i]["labels"][keep]]
            rows.append((i, box[keep], labels, r_t[i, :n, :n].cpu(), r_s[i, :n, :n].cpu()))
    if not rows:
        placeholder(path, "no validation image among those shown has >= 2 instances")
        return 0
    fig, axes = subplots(
        len(rows), 3, figsize=(11, 3.6 * len(rows)), squeeze=False, layout="constrained"
    )
    for row, (i, box, labels, mat_t, mat_s) in enumerate(rows):
        ticks = [f"{j}:{_name(lbl, names)}" for j, lbl in enumerate(labels)]
        ax = axes[row][0]
        ax.imshow(pictures[i].numpy())
        for j, (x0, y0, x1, y1) in enumerate(box.tolist()):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
            ax.text(
                x0,
                y0,
                str(j),
                color="black",
                fontsize=8,
                va="top",
                bbox={"facecolor": "yellow", "pad": 1, "lw": 0},
            )
        ax.set_title(f"image {int(targets[i]['image_id'])}: {len(labels)} instances", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        top = float(max(mat_t.max(), mat_s.max()))
        for col, (title, mat) in enumerate((("teacher R_t", mat_t), ("student R_s", mat_s)), 1):
            ax = axes[row][col]
            shown = ax.imshow(mat.numpy(), cmap="viridis", vmin=0, vmax=top)
            ax.set_xticks(range(len(ticks)), ticks, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
            ax.set_title(title, fontsize=9)
            if len(ticks) <= 8:
                for (y, x), v in zip(
                    torch.cartesian_prod(
                        torch.arange(len(ticks)), torch.arange(len(ticks))
                    ).tolist(),
                    mat.flatten().tolist(),
                    strict=True,
                ):
                    ax.text(
                        x,
                        y,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if v < 0.6 * top else "black",
                    )
        fig.colorbar(shown, ax=axes[row, 1:], shrink=0.8, label="R (row softmax)")
    fig.suptitle("Instance relation matrices, finest instance level (rows sum to 1)")
    save_figure(fig, path)
    return len(rows)


def plot_relations(
    teacher: str | Path,
    distilled: str | Path,
    modules: str | Path,
    val_json: str | Path,
    num_images: int,
    out_dir: str | Path,
) -> list[Path]:
    """Write pixel_relations.png / instance_relations.png into ``out_dir`` (a placeholder for
    one whose modules are missing; nothing without validation images); returns the paths
    written."""
    distiller, names = load_distiller(teacher, distilled, modules)
    if torch.cuda.is_available():
        distiller.cuda()
    dataset = CocoDetection(val_json, eval_transforms())
    names = names or dataset.category_names
    count = min(num_images, len(dataset))
    out = Path(out_dir)
    written: list[Path] = []
    if count == 0:
        print("[report] relation plots skipped: no validation images (or num_vis_images = 0)")
        return written
    student_maps, teacher_maps, pictures, boxes, targets, padded = _run(distiller, dataset, count)
    args = (distiller, student_maps, teacher_maps, pictures, boxes, targets, padded, names)
    method = drkd_part(distiller.method)

    def placeholder_for(png: str, why: str) -> None:
        """A picture saying why, so that no earlier run's picture passes for this run's."""
        placeholder(out / png, why)
        written.append(out / png)
        print(f"[report] {png}: {why} (placeholder written)")

    with torch.no_grad():
        if method is not None and len(method.glore_s):
            plot_pixel_relations(*args, out / PIXEL_PNG)
            drift = {
                "teacher": glore_drift(cast(list[GloRe], method.glore_t), teacher_maps),
                "student": glore_drift(cast(list[GloRe], method.glore_s), student_maps),
            }
            write_json(drift, out / DRIFT_JSON)
            print("[report] ||GloRe(F) - F|| / ||F|| per level: " + "; ".join(
                f"{side} " + " ".join(f"{v:.3f}" for v in values)
                for side, values in drift.items()))
            written += [out / PIXEL_PNG, out / DRIFT_JSON]
        else:
            placeholder_for(PIXEL_PNG, f"{modules} has no GloRe modules (distill method "
                            f"{distiller.cfg.method!r}, w_pr = {distiller.cfg.w_pr:g})")
        if method is not None and len(method.relation_s):
            shown = plot_instance_relations(*args, out / INSTANCE_PNG)
            written.append(out / INSTANCE_PNG)
            if not shown:
                print(
                    f"[report] {INSTANCE_PNG}: no image among the first {count} has "
                    ">= 2 instances (placeholder written)"
                )
        else:
            placeholder_for(INSTANCE_PNG, f"{modules} has no instance relation modules (distill "
                            f"method {distiller.cfg.method!r}, w_ir = {distiller.cfg.w_ir:g})")
    return written
