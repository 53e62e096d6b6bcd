"""`workers: auto` counts what the container may use (cgroup v2 or v1), not the node's CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings
from sidecar.config.cgroup import Limits, limits

BASE = {"upstream": {"url": "https://func.example.net"}, "auth": {"flow": "azure_cli", "scope": "api://x/.default"}}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "cpus_at_most", "memory_mb"),
    [
        ({"cpu.max": "150000 100000", "memory.max": str(128 << 20)}, 2, 128.0),  # v2: 1.5 CPUs, 128 Mi
        ({"cpu.max": "max 100000", "memory.max": "max"}, None, None),  # v2, no limits
        (
            {
                "cpu/cpu.cfs_quota_us": "50000",
                "cpu/cpu.cfs_period_us": "100000",
                "memory/memory.limit_in_bytes": str(256 << 20),
            },
            1,
            256.0,
        ),  # v1
        (
            {
                "cpu/cpu.cfs_quota_us": "-1",
                "cpu/cpu.cfs_period_us": "100000",
                "memory/memory.limit_in_bytes": str(1 << 62),
            },
            None,
            None,
        ),  # v1, no limits
        ({}, None, None),  # no cgroup files at all (a laptop)
    ],
)
def test_limits_read_v2_and_v1(
    tmp_path: Path, files: dict[str, str], cpus_at_most: int | None, memory_mb: float | None
) -> None:
    found = limits(write(tmp_path, files))
    assert found.memory_mb == memory_mb
    if cpus_at_most is not None:
        assert 1 <= found.cpus <= cpus_at_most


def test_auto_uses_the_quota_and_what_the_memory_limit_holds() -> None:
    settings = Settings(**BASE, workers="auto")
    assert settings.worker_count(Limits(cpus=48, memory_mb=None)) == 48  # no limit: every CPU allowed
    assert settings.worker_count(Limits(cpus=2, memory_mb=1024)) == 2  # the quota
    assert settings.worker_count(Limits(cpus=48, memory_mb=128)) == 2  # 128 Mi holds the parent and one more


def test_an_explicit_count_the_memory_cannot_hold_is_refused_saying_so() -> None:
    settings = Settings(**BASE, workers=4)
    assert settings.worker_count(Limits(cpus=8, memory_mb=None)) == 4
    with pytest.raises(ConfigError) as caught:
        settings.worker_count(Limits(cpus=8, memory_mb=128))
    (line,) = caught.value.problems
    assert line == (
        "workers: 4 processes need about 208 MB and the memory limit is 128 MB; use workers: 2 or less (or auto), "
        "or raise the limit"
    )
