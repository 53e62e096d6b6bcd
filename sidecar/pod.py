"""`workers: N` seen as one pod: the parent serves the admin listener, and a scrape adds up every worker.

Why in the parent: workers sharing the admin port (SO_REUSEPORT) would let the kernel pick one worker per
scrape, so Prometheus would see each worker's counters in turn and every rate would jump between them.
prometheus_client's multiprocess mode would put its Counter objects on the hot path (sidecar/metrics.py says why
we do not) and needs a shared directory of files.

How: one socketpair per worker, made before the fork like the token channel. At a scrape the parent writes one
line to each worker; the worker answers with what it served (Metrics.traffic) as one JSON line, and the parent
adds those up with its own figures: the identity-provider calls (the parent makes them) and the token's
expiry. A worker that does not answer within ANSWER_SECONDS counts with its last answer (counters never go
backwards) and `sidecar_workers{answered="false"}` says so.

process_* add up the parent and its workers (read from /proc): CPU, memory (a page the processes share counts
once per process, as `ps` adds them up) and open descriptors; the start time and the descriptor limit are the
parent's. python_* are the parent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.workers")

ANSWER_SECONDS = 1.0  # well inside Prometheus' default scrape timeout (10 s) and a kubelet probe's (1 s)
_LINE_LIMIT = 16 * 1024 * 1024  # a worker's figures: bounded label sets, far below this
_ADDED_UP = frozenset(
    {"process_virtual_memory_bytes", "process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"}
)


async def answer_scrapes(channel: socket.socket, metrics: Metrics) -> None:
    """A worker's side: each request line from the parent gets this worker's traffic figures, until the parent
    closes the channel."""
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    try:
        while line := await reader.readline():
            request = json.loads(line)
            writer.write(json.dumps({"id": request["id"], "traffic": metrics.traffic()}).encode() + b"\n")
    except ConnectionError:
        pass
    finally:
        writer.close()


class WorkerFigures:
    """The parent's side of one worker's channel."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self._channel = channel
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()  # one question at a time: answers come back in order
        self._asked = 0
        self._last: dict[str, Any] | None = None

    async def traffic(self) -> tuple[dict[str, Any] | None, bool]:
        """(the worker's figures, whether they are fresh): its answer, or its last one if it is silent now."""
        async with self._lock:
            try:
                if self._streams is None:
                    self._streams = await asyncio.open_unix_connection(sock=self._channel, limit=_LINE_LIMIT)
                reader, writer = self._streams
                self._asked += 1
                writer.write(json.dumps({"id": self._asked}).encode() + b"\n")
                async with asyncio.timeout(ANSWER_SECONDS):
                    while line := await reader.readline():
                        answer = json.loads(line)
                        if answer.get("id") == self._asked:  # an earlier question's late answer is skipped
                            self._last = answer["traffic"]
                            return self._last, True
            except (TimeoutError, ConnectionError, ValueError, KeyError) as exc:
                log.debug("worker %d did not answer a scrape: %s", self.pid, type(exc).__name__)
            return self._last, False

    async def aclose(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        else:
            self._channel.close()


class PodMetrics:
    """The pod's /metrics: the workers' traffic added up, the parent's token figures, the processes together."""

    def __init__(self, own: Metrics, workers: Sequence[WorkerFigures]) -> None:
        self._own = own
        self._workers = workers
        self._processes = _PodProcesses([os.getpid(), *(worker.pid for worker in workers)])

    async def render(self) -> bytes:
        answers = await asyncio.gather(*(worker.traffic() for worker in self._workers))
        pod = Metrics(process=False)
        pod.share_token_figures(self._own)
        for traffic, _ in answers:
            if traffic is not None:
                pod.add_traffic(traffic)
        fresh = sum(1 for _, is_fresh in answers if is_fresh)
        registry = pod.registry
        registry.register(self._processes)
        registry.register(_WorkerCount(fresh, len(answers) - fresh))
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        return generate_latest(registry)


class _WorkerCount:
    def __init__(self, answered: int, silent: int) -> None:
        self._answered = answered
        self._silent = silent

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sidecar_workers",
            "Worker processes, by whether they answered this scrape (a silent one counts with its last answer)",
            labels=["answered"],
        )
        family.add_metric(["true"], self._answered)
        family.add_metric(["false"], self._silent)
        yield family


class _PodProcesses:
    """process_* for several processes together; the first one's (the parent's) start time and fd limit."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._collectors = [ProcessCollector(registry=None, pid=lambda pid=pid: pid) for pid in pids]  # type: ignore[misc]

    def describe(self) -> list[Metric]:
        return []  # not collected at registration: a scrape reads /proc once

    def collect(self) -> Iterator[Metric]:
        per_process = [{family.name: family for family in collector.collect()} for collector in self._collectors]
        for name, first in per_process[0].items():
            family = Metric(name, first.documentation, first.type)
            for sample in first.samples:
                value = sample.value
                if name in _ADDED_UP:
                    value = sum(other.samples[0].value for other in (each.get(name) for each in per_process) if other)
                family.add_sample(sample.name, sample.labels, value)
            yield family
