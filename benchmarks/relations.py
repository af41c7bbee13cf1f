"""Do instance relations carry anything the student lacks? (A measurement, not a test.)

    python -m benchmarks.relations --teacher models/teacher.pt \
        --students models/student.pt models/student_drkd.pt [--data data/prepared/val.json]

For every validation image, the RoIAlign 3x3 features of its GT boxes on each of the two finest
FPN levels (as L_INS and L_IR pool them) are compared pairwise within the image by cosine
similarity, in each model's own feature space. Printed per model:
- same-class AUC: how well the pair's similarity tells "same class" from "different class"
  (0.5 = not at all, 1 = perfectly), the relational content a relation loss could transfer;
- r vs teacher: Pearson correlation of the model's pair similarities with the teacher's. A
  student whose relations already match the teacher's (r near 1) has nothing left for L_IR
  to teach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.ops import roi_align

from drkd import cli
from drkd.checkpoint import load_detector
from drkd.data.coco import CocoDetection, collate
from drkd.data.transforms import eval_transforms
from drkd.methods.drkd import ROI_SIZE, instance_rois
from drkd.modules.relation import cosine_similarity, pad_instances, pair_mask
from drkd.taps import part


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative) + P(tie) / 2;
    (K,), (K,) bool. Tied scores share their mean rank."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]  # 1-based, ties averaged
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def pair_similarities(
    detector: torch.nn.Module, loader: DataLoader, level: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every within-image pair (i < j) of GT instances on FPN ``level``
    (0 = finest), (P,), and whether the pair shares a class, (P,) bool; same pair order for
    every model."""
    sims, same = [], []
    for images, targets in loader:
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                    "labels": t["labels"]} for t in targets]
        images = [im.as_subclass(torch.Tensor) for im in images]
        image_list, scaled = part(detector, "transform")(images, targets)
        finest = list(part(detector, "backbone")(image_list.tensors).values())[level]
        rois, index, labels = instance_rois(scaled)
        scale = finest.shape[-1] / image_list.tensors.shape[-1]
        pooled = roi_align(finest.float(), rois, ROI_SIZE, scale, sampling_ratio=2,
                           aligned=True).flatten(1)
        e, mask = pad_instances(pooled, index, len(scaled))
        lab, _ = pad_instances(labels[:, None].float(), index, len(scaled))
        upper = pair_mask(mask) & torch.ones_like(pair_mask(mask)).triu(1)
        sims.append(cosine_similarity(e)[upper])
        same.append((lab[:, :, None, 0] == lab[:, None, :, 0])[upper])
    return torch.cat(sims), torch.cat(same)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--students", nargs="+", default=["models/student.pt",
                                                           "models/student_drkd.pt"])
    parser.add_argument("--data", default="data/prepared/val.json")
    args = parser.parse_args(argv)
    dataset = CocoDetection(args.data, eval_transforms())
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
    paths = [Path(p) for p in [args.teacher, *args.students]]
    # Named by file stem, or by folder/stem where stems repeat (compare cells' model.pt).
    unique = len({p.stem for p in paths}) == len(paths)
    names = [p.stem if unique else f"{p.parent.name}/{p.stem}" for p in paths]
    detectors = {n: load_detector(p)[0].eval() for n, p in zip(names, paths, strict=True)}
    print("| FPN level (0 = finest) | model | same-class AUC | r vs teacher |\n|---|---|---:|---:|")
    for level in (0, 1):
        results = {name: pair_similarities(d, loader, level) for name, d in detectors.items()}
        t_sims, same = results[names[0]]
        for name, (sims, _) in results.items():
            r = torch.corrcoef(torch.stack([sims, t_sims]))[0, 1]
            print(f"| {level} | {name} | {auc(sims, same):.3f} | {float(r):.3f} |")
    print(f"\n{len(same)} within-image instance pairs, {int(same.sum())} of the same class")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
