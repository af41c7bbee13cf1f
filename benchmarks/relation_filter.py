"""What a trained DRKD run's relation filter does, and what its L_IR still teaches (a
measurement, not a test).

    python -m benchmarks.relation_filter [--teacher models/teacher.pt] \
        [--student models/student_drkd.pt] [--modules models/drkd_modules.pt] \
        [--data data/prepared/val.json] [--images 64]

On the first ``--images`` validation images, through the trained modules (the batch exactly as
training sees it), per instance level:
- top share: each row's largest filter weight over the sum of its weights (partners only,
  rows with >= 2 partners): 1.000 = the filter gives one partner all of the row (one-hot);
  ``uniform`` is 1 / partners, averaged over the same rows;
- one-hot rows: the share of rows whose top share exceeds 0.99;
- filter AUC: how well the filter's weights tell same-class pairs from the others (0.5 = not
  at all; the filter is trained on exactly that);
- self mass: the teacher matrix's mean weight on an instance's own pair R_t[i, i];
- R_t top share / R_t one-hot rows: the same two for the teacher's relation rows themselves
  (what L_IR asks the student to match): a filter's weights are bounded, but a sharp
  temperature can still put a whole row on one partner;
- L_IR (unweighted, the run's target and reduction) of the distilled student under the
  trained filter, a fresh filter (seed 0) and no filter.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from benchmarks.relations import auc
from drkd import cli
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.methods.drkd import DRKD, drkd_part, instance_rois, pad_labels
from drkd.modules.relation import RelationFilter, pair_mask
from drkd.relations_plot import load_distiller
from drkd.taps import part


@torch.no_grad()
def filter_statistics(method: DRKD, student_maps: list[torch.Tensor],
                      teacher_maps: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                      batch_shape: tuple[int, int], level: int) -> dict[str, float]:
    """The statistics above for one instance level of one batch; targets as the detector's
    transform left them (boxes in padded-batch pixels, labels)."""
    rois, index, labels = instance_rois(targets)
    _, e_t, mask, e_s = method.instance_features(level, student_maps, teacher_maps, rois, index,
                                                 batch_shape)
    out: dict[str, float] = {"instances": float(mask.sum())}
    _, r_t, _ = method.matrices(level, e_s, e_t, mask)
    valid = mask.sum(1) > 0
    out["self mass"] = float(r_t.diagonal(dim1=1, dim2=2)[mask].mean()) if valid.any() else 0.0
    kept = (r_t > 0).sum(-1) >= 2  # rows relating at least 2 partners
    if kept.any():
        top = r_t.max(-1).values[kept]  # rows sum to 1
        out["R_t top share"] = float(top.mean())
        out["R_t one-hot rows"] = float((top > 0.99).float().mean())
    filters = method.filters
    if len(filters):
        weights = filters[level](e_t, mask)
        partners = pair_mask(mask, self_pairs=False)
        rows = torch.where(partners, weights, 0.0)
        counted = partners.sum(-1) >= 2  # (B, n)
        share = rows.max(-1).values / rows.sum(-1).clamp(min=1e-12)
        out["top share"] = float(share[counted].mean())
        out["uniform"] = float((1 / partners.sum(-1)[counted].float()).mean())
        out["one-hot rows"] = float((share[counted] > 0.99).float().mean())
        padded = pad_labels(labels, index, len(targets))
        same = padded[:, :, None] == padded[:, None, :]
        upper = partners & torch.ones_like(partners).triu(1)
        out["filter AUC"] = auc(weights[upper], same[upper])
    out["L_IR trained filter"] = float(method.relation_loss(level, e_s, e_t, mask)[0])
    trained = method.filters
    try:
        if len(trained):
            torch.manual_seed(0)
            fresh = RelationFilter(trained[level].query.in_features,
                                   trained[level].query.out_features)
            method.filters = nn.ModuleList(
                [fresh if i == level else f for i, f in enumerate(trained)])
            out["L_IR fresh filter"] = float(method.relation_loss(level, e_s, e_t, mask)[0])
        method.filters = nn.ModuleList()
        out["L_IR no filter"] = float(method.relation_loss(level, e_s, e_t, mask)[0])
    finally:
        method.filters = trained
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--student", default="models/student_drkd.pt")
    parser.add_argument("--modules", default="models/drkd_modules.pt")
    parser.add_argument("--data", default="data/prepared/val.json")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args(argv)
    distiller, _ = load_distiller(args.teacher, args.student, args.modules)
    method = drkd_part(distiller.method)
    if method is None or not len(method.relation_s):
        raise UserError(f"{args.modules}: the run has no DRKD instance relations "
                        f"(method {distiller.cfg.method}, or w_ir 0)")
    dataset = CocoDetection(args.data, eval_transforms())
    items = [dataset[i] for i in range(min(args.images, len(dataset)))]
    images = [im.as_subclass(torch.Tensor) for im, _ in items]
    targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                "labels": t["labels"]} for _, t in items]
    with torch.no_grad():
        image_list, scaled = part(distiller.student, "transform")(images, targets)
        batch = image_list.tensors
        student_maps = list(part(distiller.student, "backbone")(batch).values())
        teacher_maps = list(part(distiller.teacher, "backbone")(batch).values())
    shape = (batch.shape[-2], batch.shape[-1])
    stats = [filter_statistics(method, student_maps, teacher_maps, scaled, shape, level)
             for level in range(method.instance_levels)]
    print(f"{args.modules}: {len(items)} validation images, "
          f"{int(stats[0]['instances'])} instances")
    print("| instance level | " + " | ".join(k for k in stats[0] if k != "instances") + " |")
    print("|---" * len(stats[0]) + "|")
    for level, row in enumerate(stats):
        cells = [f"{v:.3g}" if "L_IR" in k else f"{v:.3f}" for k, v in row.items()
                 if k != "instances"]
        print(f"| {level} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
