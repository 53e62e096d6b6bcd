"""Request/response load with wrk: the same script, threads and durations for every variant."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

CHAT_PATH = "/openai/deployments/x/chat/completions?api-version=2024-06-01"
SCRIPT = Path(__file__).with_name("chat.lua")


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def threads_for(connections: int) -> int:
    # wrk's threads compete with the servers for the two cores: two are enough to saturate nginx here
    return min(2, connections)


def run_wrk(port: int, connections: int, seconds: int, *, timeout_s: int = 5) -> WrkResult:
    argv = [
        "wrk",
        f"-t{threads_for(connections)}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(SCRIPT),
        f"http://127.0.0.1:{port}{CHAT_PATH}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    errors = sum(int(data[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts", "non2xx"))
    return WrkResult(
        connections=connections,
        requests=int(data["requests"]),
        seconds=int(data["duration_us"]) / 1e6,
        errors=errors,
        p50_ms=int(data["p50_us"]) / 1000,
        p90_ms=int(data["p90_us"]) / 1000,
        p99_ms=int(data["p99_us"]) / 1000,
        mean_ms=float(data["mean_us"]) / 1000,
    )
