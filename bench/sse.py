"""SSE streams over raw sockets: the time to the first event, for one stream, a burst, and many held at once.

A raw asyncio client keeps the client's own cost small and the same for every variant: it writes one
request, and times from the connect to the first `data:` byte of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

STREAM_BODY = json.dumps(
    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()


@dataclass(frozen=True)
class Target:
    """Where a stream goes: the port, the path, and the bearer token a direct caller must bring itself."""

    name: str
    port: int
    path: str
    token: str | None = None

    def request(self, keep_alive: bool = False) -> bytes:
        auth = f"Authorization: Bearer {self.token}\r\n" if self.token else ""
        connection = "" if keep_alive else "Connection: close\r\n"
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\n{auth}Content-Length: {len(STREAM_BODY)}\r\n{connection}\r\n"
        )
        return head.encode() + STREAM_BODY


@dataclass
class Stream:
    ttfb: float | None = None  # seconds from the connect to the first event's bytes
    complete: bool = False  # the stream ended with `data: [DONE]`
    error: str | None = None


@dataclass
class Gauge:
    """How many streams are open (first event received, end not yet) now, and at most."""

    now: int = 0
    peak: int = 0

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def down(self) -> None:
        self.now -= 1


async def stream(target: Target, *, hold: bool, timeout: float, gauge: Gauge | None = None) -> Stream:
    """One stream; `hold` reads it to the end (and checks it ends with [DONE]), else it is dropped after the
    first event."""
    result = Stream()
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target.port), timeout)
    except (OSError, TimeoutError) as exc:
        result.error = f"connect: {type(exc).__name__}"
        return result
    opened = False
    try:
        writer.write(target.request())
        seen = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                result.error = "closed before the first event"
                return result
            seen += chunk
            head_end = seen.find(b"\r\n\r\n")
            if head_end >= 0 and b"data:" in seen[head_end:]:
                result.ttfb = time.perf_counter() - started
                break
        if not seen.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            result.error = seen.split(b"\r\n", 1)[0].decode(errors="replace")
            return result
        if not hold:
            return result
        if gauge is not None:
            gauge.up()
            opened = True
        tail = seen[-64:]
        while b"data: [DONE]" not in tail:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            tail = (tail + chunk)[-64:]
        result.complete = b"data: [DONE]" in tail
        if not result.complete:
            result.error = "ended without [DONE]"
    except (OSError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}"
    finally:
        if opened and gauge is not None:
            gauge.down()
        writer.transport.abort()  # no lingering close: the next measurement starts clean
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def kept_alive(target: Target, rounds: int, timeout: float) -> list[float]:
    """Streams one after another on one kept-alive connection, as an SDK's pool does; the time from
    sending the request to the first event's bytes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target.port), timeout)
    request = target.request(keep_alive=True)
    times: list[float] = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            writer.write(request)
            seen = b""
            first: float | None = None
            # the chunked body's last chunk (after [DONE]) ends the response; the connection stays open
            while not (b"data: [DONE]" in seen and seen.endswith(b"\r\n0\r\n\r\n")):
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
                if not chunk:
                    raise RuntimeError(f"{target.name}: the connection closed mid-stream")
                seen += chunk
                if first is None and b"data:" in seen[seen.find(b"\r\n\r\n") :]:
                    first = time.perf_counter() - started
            if not seen.startswith(b"HTTP/1.1 200") or first is None:
                status_line = seen.split(b"\r\n", 1)[0]
                raise RuntimeError(f"{target.name}: {status_line!r}")
            times.append(first)
            await asyncio.sleep(0.005)
    finally:
        writer.transport.abort()
    return times


async def sequential_ttfb(targets: list[Target], rounds: int, timeout: float) -> dict[str, list[float]]:
    """One stream at a time on a new connection each, the targets interleaved so drift hits them alike."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            result = await stream(target, hold=True, timeout=timeout)
            if result.ttfb is None or not result.complete:
                raise RuntimeError(f"{target.name}: stream failed: {result.error}")
            times[target.name].append(result.ttfb)
            await asyncio.sleep(0.005)
    return times


async def burst(target: Target, size: int, timeout: float) -> list[float]:
    """`size` streams started at once; their times to the first event."""
    results = await asyncio.gather(*(stream(target, hold=True, timeout=timeout) for _ in range(size)))
    failed = [r.error for r in results if r.ttfb is None or not r.complete]
    if failed:
        raise RuntimeError(f"{target.name}: {len(failed)} of {size} burst streams failed, e.g. {failed[0]}")
    return [r.ttfb for r in results if r.ttfb is not None]


async def hold_many(
    target: Target,
    count: int,
    *,
    batch: int,
    batch_gap: float,
    timeout: float,
    sample: Callable[[], None],
    sample_every: float = 0.05,
) -> tuple[list[Stream], int]:
    """`count` streams held to their end, opened in batches; `sample()` runs every `sample_every` s meanwhile.

    Returns the streams and the most that were open at the same moment.
    """
    gauge = Gauge()
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            sample()
            await asyncio.sleep(sample_every)

    sampling = asyncio.create_task(sampler())
    tasks: list[asyncio.Task[Stream]] = []
    try:
        for start in range(0, count, batch):
            for _ in range(min(batch, count - start)):
                tasks.append(asyncio.create_task(stream(target, hold=True, timeout=timeout, gauge=gauge)))
            await asyncio.sleep(batch_gap)
        results = await asyncio.gather(*tasks)
    finally:
        done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(sampling, *tasks, return_exceptions=True)
    sample()
    return list(results), gauge.peak
