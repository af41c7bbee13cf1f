"""Run by tests/test_ddp.py under torchrun (2 gloo processes): ``fit`` on a toy module whose
ranks draw different amounts of random numbers and have different losses, 2 epochs straight
and 1 epoch then resumed for the second; then each rank with a work dir of its own, where
only rank 0's holds a checkpoint. Rank 0 writes the outcome to OUT/result.json."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from drkd.config import TrainConfig, UserError
from drkd.engine import fit


class RankNoise(nn.Module):
    """loss = sum(w) * (rank + 1) * (sum of rank + 1 uniform draws): each rank's random
    stream advances at its own pace, and the ranks' losses differ."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.first_draw: float | None = None

    def forward(self, images: list[torch.Tensor], targets: list[Any]) -> dict[str, torch.Tensor]:
        rank = dist.get_rank()
        draws = torch.rand(rank + 1)
        if self.first_draw is None:
            self.first_draw = float(draws[0])
        return {"loss_noise": self.w.sum() * (rank + 1) * draws.sum()}


def run(work: Path, epochs: int) -> tuple[RankNoise, list[dict[str, float]]]:
    torch.manual_seed(0)
    module = RankNoise()
    data = [(torch.zeros(3, 4, 4), {"boxes": torch.zeros(0, 4)}) for _ in range(8)]
    cfg = TrainConfig(epochs=epochs, batch_size=2, optimizer="sgd", lr=0.1, warmup_steps=0,
                      schedule="step", num_workers=0, log_every=1, amp="off", hflip=0.0)
    history = fit(module, data, cfg, seed=0, work_dir=work, fingerprint="toy", desc="toy")
    return module, history


def gather(value: Any) -> list[Any]:
    every_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, value)
    return every_rank


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    straight, history = run(out / "straight", 2)
    run(out / "resumed", 1)  # leaves epoch 0's checkpoint, as a run killed after it would
    resumed, _ = run(out / "resumed", 2)
    losses = [row["loss"] for row in history]
    every_rank = gather(losses)
    first_draws = gather(straight.first_draw)
    # Work dirs on each node's own disk: only rank 0's holds the checkpoint.
    if rank == 0:
        (out / "local0").mkdir()
        shutil.copy(out / "resumed" / "last.pt", out / "local0" / "last.pt")
    dist.barrier()
    try:
        run(out / f"local{rank}", 3)
        refused = ""
    except UserError as err:
        refused = str(err)
    refusals = gather(refused)
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "resumed_equals_straight": bool(torch.equal(straight.w, resumed.w)),
            "logged_losses_equal_on_every_rank": all(x == losses for x in every_rank),
            "steps": len(losses),
            "ranks_draw_their_own_numbers": first_draws[0] != first_draws[1],
            "local_work_dirs_refused_on_every_rank": refusals}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
