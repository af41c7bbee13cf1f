"""Where a process runs: the one device-picking rule shared by training and evaluation, and
what it has used of that device's memory.

Its own module so that the evaluate stage (and its DVC dependencies) need not import the
training loop just to choose a device.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

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


def cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota
    (cgroup v2 ``cpu.max``: "QUOTA PERIOD" or "max PERIOD"), which affinity does not show."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max":
        return count
    return max(1, min(count, math.ceil(int(quota) / int(period))))


def thread_share(workers: int) -> int:
    """This process's cores split among ``workers`` processes running at once, at least 1 each:
    what each should take. Threads beyond the cores do not add speed, they subtract it: libgomp's
    threads spin while they wait, so two 2-thread trainings on 2 cores run several times slower
    than one after the other."""
    return max(1, cores() // workers)
