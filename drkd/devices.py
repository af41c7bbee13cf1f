"""Where a process runs: the one device-picking rule shared by training and evaluation, and
what it has used of that device's memory.

Its own module so that the evaluate stage (and its DVC dependencies) need not import the
training loop just to choose a device.
"""

from __future__ import annotations

import os
import resource

import torch


def pick_device() -> torch.device:
    """This process's CUDA device (``LOCAL_RANK`` under torchrun, else 0), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def peak_memory_mb() -> float:
    """This process's peak memory so far: allocated CUDA memory on a GPU, else peak resident
    memory (Linux reports KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(pick_device()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thread_share(workers: int) -> int:
    """This process's cores split among ``workers`` processes running at once, at least 1 each:
    what each should take. Threads beyond the cores do not add speed, they subtract it: libgomp's
    threads spin while they wait, so two 2-thread trainings on 2 cores run several times slower
    than one after the other."""
    return max(1, len(os.sched_getaffinity(0)) // workers)
