"""Run by tests/test_methods.py under torchrun (2 gloo processes): every distillation method
wrapped in DDP (find_unused_parameters off) for 2 steps; rank 0 writes <name>.ok per method."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from conftest import toy_model
from drkd import registry
from drkd.config import DistillConfig, InstanceRelationConfig, PixelRelationConfig
from drkd.distiller import Distiller
from drkd.models import build_detector

SMALL = {"pixel": PixelRelationConfig(nodes=(4,) * 5, states=(8,) * 5),
         "instance": InstanceRelationConfig(embed_dim=16, filter_hidden=8)}
# The paper's instance relations: learned theta/phi, L_IR on the refined features (g, W).
LEARNED = {"target": "features", "similarity": "learned", "tau": 9.787733192560397}
CONFIGS = {
    "drkd": DistillConfig(**SMALL),  # the default: cosine relations, matrix target
    "drkd-learned": DistillConfig(pixel=SMALL["pixel"], instance=InstanceRelationConfig(
        embed_dim=16, filter_hidden=8, **LEARNED)),  # type: ignore[arg-type]
    "drkd-no-ir": DistillConfig(w_ir=0.0, **SMALL),
    # presets/paper_retinanet.yaml: the release's instance relations alone, no filter
    "drkd-release-ir": DistillConfig(
        release=True, reduction="norm", w_pr=0.0, w_ins=0.0, pixel=SMALL["pixel"],
        instance=InstanceRelationConfig(filter=False, **LEARNED)),  # type: ignore[arg-type]
    **{m: DistillConfig(method=m) for m in registry.names() if m != "drkd"},  # every other one
}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        student = build_detector(toy_model(fpn_channels=16), 4)
        teacher = build_detector(toy_model(fpn_channels=24), 4)
        model = DistributedDataParallel(Distiller(student, teacher, cfg))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
            targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
                        "labels": torch.tensor([1, 2])} for _ in images]
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if rank == 0:
            (out / f"{name}.ok").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
