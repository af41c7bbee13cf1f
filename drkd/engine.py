"""The one training loop, shared by the teacher, the baseline student and distillation.

``fit`` trains any module whose ``forward(images, targets)`` returns a dict of
named losses (a torchvision detector in train mode, or a Distiller). It sums
every entry (RetinaNet's keys have no ``loss_`` prefix), logs each by name, and
owns everything a run needs to be repeatable: seeded data order, warm-up +
cosine/step schedule, gradient clipping, AMP on CUDA, DDP under torchrun, and a
checkpoint every epoch from which a killed run resumes to the same result.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from drkd.checkpoint import load, save_atomic
from drkd.config import NonFiniteLoss, TrainConfig, UserError
from drkd.data.coco import collate
from drkd.devices import peak_memory_mb, pick_device

StepCallback = Callable[[int, dict[str, float]], None]
EpochCallback = Callable[[int, nn.Module], None]


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


@contextmanager
def distributed() -> Iterator[None]:
    """Join the torchrun process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if (
        "WORLD_SIZE" in os.environ
        and int(os.environ["WORLD_SIZE"]) > 1
        and not dist.is_initialized()
    ):
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(pick_device())
        try:
            yield
        except BaseException:
            # No barrier: the other ranks may be inside a collective that this one left, and
            # would hang there; this process exits, and torchrun stops the others.
            dist.destroy_process_group()
            raise
        dist.barrier()
        dist.destroy_process_group()
    else:
        yield


def lr_factor(step: int, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up from 0.001x, then cosine to 0 or steps of ``gamma`` at epoch milestones."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = 0.001 + (1 - 0.001) * step / cfg.warmup_steps
    if cfg.schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    passed = sum(step >= m * steps_per_epoch for m in cfg.milestones)
    return warm * cfg.gamma**passed


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused kernels (CPU and CUDA): the same update as the per-tensor loop, but one kernel
    for all parameters instead of one per tensor, which matters for the many small tensors of
    the distillation modules (measured: docs/speed.md)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype ``train.amp`` asks for on ``device``, None for fp32.

    CUDA only: on a CPU without native bf16 convolutions, bf16 autocast makes a step many
    times slower (benchmarks/speed.py measures it; docs/speed.md has the numbers), so CPU
    runs stay in fp32."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def train_step(
    module: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None,
) -> tuple[list[str], torch.Tensor]:
    """One optimisation step on one batch; returns the loss names (the module's terms, then
    ``loss``, their sum) and their values as one detached fp32 tensor, still on the device.

    Nothing here waits for the device: the caller reads the values (one transfer) when it
    needs them, so a GPU runs the whole step without a host round trip."""
    with torch.autocast(module_device(module).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = module(images, targets)
    total = sum(losses.values())
    terms = torch.stack([v.detach().float() for v in (*losses.values(), total)])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if cfg.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for group in optimizer.param_groups for p in group["params"]], cfg.clip_grad_norm
        )
    scaler.step(optimizer)
    scaler.update()
    return [*losses, "loss"], terms


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters live (what autocast and a GradScaler must be told)."""
    return next(module.parameters()).device


def _to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
    ]
    return images, targets


def _loader(dataset: Dataset[Any], cfg: TrainConfig, seed: int, epoch: int) -> DataLoader[Any]:
    """A loader whose order and augmentation depend only on (seed, epoch, rank): resumable
    exactly."""
    rank, size = world()
    # Each rank's own flips (and loader workers' seeds); rank 0's as a single process's.
    generator = torch.Generator().manual_seed(seed * 1000 + epoch + (rank << 32))
    sampler: Any
    if size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed * 1000, drop_last=True
        )  # as many batches as steps_per_epoch
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(cast(Sized, dataset), generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=generator,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )


def schedule(cfg: TrainConfig, num_images: int, processes: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run of ``cfg`` on ``num_images`` images."""
    steps_per_epoch = num_images // (cfg.batch_size * processes)
    if steps_per_epoch == 0 and cfg.epochs > 0:  # epochs 0 keeps a given model as it is
        raise UserError(
            f"train.batch_size: {cfg.batch_size} x {processes} processes exceeds the "
            f"{num_images} training images"
        )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return steps_per_epoch, total_steps


def gathered(state: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Every rank's ``state`` (a CPU byte tensor, e.g. an RNG state), in rank order."""
    if size == 1:
        return [state]
    states: list[Any] = [None] * size
    dist.all_gather_object(states, state)
    return states


def rank_state(saved: Any, rank: int) -> torch.Tensor:
    """This rank's state of a saved ``gathered`` list (one state alone: a checkpoint from
    before per-rank states)."""
    return saved[rank] if isinstance(saved, list) else saved


def fit(
    module: nn.Module,
    dataset: Dataset[Any],
    cfg: TrainConfig,
    *,
    seed: int,
    work_dir: str | Path,
    fingerprint: str = "",
    desc: str = "train",
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``module`` in place; return the logged loss history (one row per ``log_every`` steps;
    its ``seconds`` column: wall time of the epochs' step loops so far, with their data loading
    and ``on_step`` calls, summed over a resumed run's parts; setup, checkpoints and
    ``on_epoch`` not; ``peak_memory_mb``: this process's peak so far, ``drkd.devices``;
    ``threads``: its intra-op thread count).

    ``work_dir/last.pt`` holds the state after the last finished epoch; a run with the same
    ``fingerprint`` (config + data hash), process count, device type and precision resumes from
    it, any other starts afresh (under DDP, ranks that would resume from different steps stop
    with a UserError). ``on_step(step, losses)`` gets loss means every ``log_every`` steps,
    ``on_epoch(epoch, module)`` runs after each epoch's checkpoint (rank 0 only).
    """
    device = pick_device()
    rank, size = world()
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch, total_steps = schedule(cfg, len(cast(Sized, dataset)), size)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    train_model: nn.Module = module
    if rank:  # its own MGD masks and flips; DDP gives every rank rank 0's weights
        torch.manual_seed(seed * 1000 + rank)
    if size > 1:
        train_model = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    work_dir = Path(work_dir)
    last = work_dir / "last.pt"
    step, start_epoch, history = 0, 0, []
    window: dict[str, float] = {}  # loss sums since the last logged row (may span epochs)
    window_steps = 0
    seconds = 0.0  # in finished epochs' step loops
    precision = {"device": device.type, "amp": str(amp_dtype)}
    state = load(last) if last.is_file() else None
    # The process count sets the steps per epoch and each rank's data shard, the device and
    # precision the scaler's and RNGs' states: a run killed under others is not continued
    # under these (a checkpoint from before the device was saved: as saved).
    resumable = state is not None and (
        state.get("fingerprint") == fingerprint and state.get("processes") == size
        and all(state.get(k, v) == v for k, v in precision.items()))
    if size > 1:  # all ranks from one point: a rank that starts afresh would hang the others
        point = state["step"] if state is not None and resumable else -1
        points = [int(t) for t in gathered(torch.tensor(point), size)]
        if len(set(points)) > 1:
            raise UserError(
                f"{last}: the ranks would resume from different steps ({points}, -1: afresh); "
                "the work dir must be on storage that every rank reads")
    if state is not None and resumable:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(rank_state(state["rng"], rank))
        if device.type == "cuda" and "cuda_rng" in state:  # MGD's masks are drawn there
            torch.cuda.set_rng_state(rank_state(state["cuda_rng"], rank), device)
        step, start_epoch, history = state["step"], state["epoch"] + 1, state["history"]
        window, window_steps = state["window"], int(state["window_steps"])
        seconds = float(state["seconds"])
        if is_main():
            tqdm.write(f"[{desc}] resuming after epoch {start_epoch} (step {step}) from {last}")
    elif state is not None and is_main():
        tqdm.write(f"[{desc}] {last} is from another config, dataset, process count, device or "
                   "precision; starting afresh")
    del state  # loading copied it into the module: do not hold a second copy all run

    def set_lr() -> None:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg, total_steps, steps_per_epoch)

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=desc,
        unit="step",
        disable=rank != 0,
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        train_model.train()
        epoch_start = time.perf_counter()
        for images, targets in _loader(dataset, cfg, seed, epoch):
            if step >= total_steps:
                break
            images, targets = _to_device(images, targets, device)
            set_lr()
            names, terms = train_step(
                train_model, images, targets, optimizer, scaler, cfg, amp_dtype
            )
            if size > 1:  # log the whole batch's means, and every rank sees a NaN at once
                dist.all_reduce(terms)
                terms /= size
            # One transfer a step (the NaN check needs the values): the only wait on a GPU.
            values = dict(zip(names, terms.tolist(), strict=True))
            for name, value in values.items():
                if not math.isfinite(value):
                    # This step's update is discarded with the process; the checkpoint on
                    # disk is from the end of the last finished epoch.
                    raise NonFiniteLoss(
                        f"[{desc}] step {step}: loss term '{name}' is {value}; "
                        f"last good checkpoint kept at {last if last.exists() else '(none yet)'}"
                    )
                window[name] = window.get(name, 0.0) + value
            step += 1
            window_steps += 1
            bar.update(1)
            if window_steps == cfg.log_every or step == total_steps:
                row = {k: v / window_steps for k, v in window.items()}
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["epoch"] = float(epoch)
                row["seconds"] = seconds + time.perf_counter() - epoch_start
                row["peak_memory_mb"] = peak_memory_mb()
                row["threads"] = float(torch.get_num_threads())
                bar.set_postfix(loss=f"{row['loss']:.3f}", epoch=epoch)
                history.append({"step": float(step), **row})
                if on_step is not None and rank == 0:
                    on_step(step, row)
                window, window_steps = {}, 0
        seconds += time.perf_counter() - epoch_start
        # Every rank's random state (each draws its own MGD masks and samples), so that a
        # resumed run continues each rank's stream: a collective, so before rank 0 saves.
        rng = gathered(torch.get_rng_state(), size)
        cuda_rng = (gathered(torch.cuda.get_rng_state(device), size)
                    if device.type == "cuda" else None)
        if rank == 0:
            save_atomic(
                {
                    "fingerprint": fingerprint,
                    "processes": size,
                    **precision,
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng,
                    **({"cuda_rng": cuda_rng} if cuda_rng is not None else {}),
                    "step": step,
                    "epoch": epoch,
                    "history": history,
                    "window": window,
                    "window_steps": window_steps,
                    "seconds": seconds,
                },
                last,
            )
            if on_epoch is not None:
                on_epoch(epoch, module)
        if size > 1:
            dist.barrier()
    bar.close()
    return history
