"""What the container may use: the cgroup's CPU quota and memory limit (v2, else v1), for `workers: auto`.

A pod without a CPU limit still sees every CPU of the node through os.sched_getaffinity; a worker costs about
WORKER_MB of memory, so counting the node's CPUs inside a 128 Mi limit is an OOM kill waiting to happen.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_MB = 64  # the serving parent: ~59 MB idle (README, Performance)
WORKER_MB = 48  # each further worker process (bench/README.md)


@dataclass(frozen=True, slots=True)
class Limits:
    cpus: int  # CPUs this process may run on, capped by the cgroup's quota
    memory_mb: float | None  # the cgroup's memory limit, None when unlimited


def limits(root: Path = CGROUP_ROOT) -> Limits:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return Limits(cpus=max(1, cpus), memory_mb=_memory_limit_mb(root))


def fitting_workers(memory_mb: float | None) -> int | None:
    """The most workers whose memory fits the limit (None: no limit)."""
    if memory_mb is None:
        return None
    return max(1, 1 + int((memory_mb - PARENT_MB) // WORKER_MB))


def _cpu_quota(root: Path) -> float | None:
    v2 = _read(root / "cpu.max")  # "max 100000" or "150000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    quota_v1, period_v1 = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_v1 is None or period_v1 is None or int(quota_v1) <= 0:
        return None
    return int(quota_v1) / int(period_v1)


def _memory_limit_mb(root: Path) -> float | None:
    value = _read(root / "memory.max") or _read(root / "memory" / "memory.limit_in_bytes")
    if value is None or value == "max":
        return None
    limit = int(value)
    return None if limit >= 1 << 60 else limit / (1024 * 1024)  # v1 says "no limit" with a huge number


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None
