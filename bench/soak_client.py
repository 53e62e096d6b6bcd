"""The soak's caller: planned operations sent over kept-alive HTTP/1.1 connections, each answer judged.

A raw asyncio client (like sse.py's) keeps the driver's CPU small next to the sidecar's on two shared cores:
it writes one well-formed origin-form request under /openai/ and reads the answer by its framing
(Content-Length or chunked). Every operation knows in advance what it should get back, so an answer is
either expected (ok, a scripted fault passed through, a stream abandoned or cut as planned) or not.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import paced
import sse

API_VERSION = "api-version=2024-06-01"
EMBEDDINGS_BODY = json.dumps(
    {
        "model": "text-embedding-3-small",
        "input": [f"soak sentence number {n}" for n in range(4)],
        "dimensions": 256,
        "encoding_format": "base64",  # the openai SDK's default
    }
).encode()
FAULT_BODY = '{"error":{"code":"InternalServerError","message":"soak fault"}}'
# The upstream cuts a faulted stream after this many bytes of its body: two or three events in.
RESET_AFTER_BYTES = 600
OP_TIMEOUT = 30.0  # seconds for one operation, the hanging-upstream fault's upstream.read_timeout included
_NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


@dataclass(frozen=True, slots=True)
class Op:
    """One planned call. `fault` is what the upstream is scripted to do for it (None: behave)."""

    index: int
    kind: str  # "chat" | "embeddings" | "stream"
    fault: str | None = None  # "500" | "429" | "hang" | "reset" (streams only)
    abandon: bool = False  # a stream the caller drops after its first event

    @property
    def deployment(self) -> str:
        # a faulted call gets a deployment name of its own: the emulator's script matches it and nothing else
        if self.fault:
            return f"soak-f{self.index}"
        return "text-embedding-3-small" if self.kind == "embeddings" else "gpt-4o-mini"

    def request(self, port: int) -> bytes:
        operation = "embeddings" if self.kind == "embeddings" else "chat/completions"
        path = f"/openai/deployments/{self.deployment}/{operation}?{API_VERSION}"
        if self.kind == "stream":
            return sse.Target(self.kind, port, path).request(keep_alive=True)
        body = EMBEDDINGS_BODY if self.kind == "embeddings" else paced.CHAT_BODY
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def script(self) -> dict[str, object]:
        """The emulator's one-shot behaviour for this call (bench/emulators.py `script`)."""
        match = f"/deployments/{self.deployment}/"
        if self.fault == "500":
            return {"status": 500, "headers": {"Content-Type": "application/json"}, "body": FAULT_BODY, "match": match}
        if self.fault == "429":
            return {"preset": "rate_limited", "retry_after": 1, "match": match}
        if self.fault == "hang":
            return {"hang": True, "match": match}
        if self.fault == "reset":
            return {"preset": "stream_reset", "after_bytes": RESET_AFTER_BYTES, "match": match}
        raise ValueError(f"no fault planned for {self}")


@dataclass(frozen=True)
class Mix:
    """How many of each operation one phase sends."""

    requests: int
    streams: int
    abandon_share: float = 0.2
    faults_500: float = 0.004  # shares of the ordinary requests
    faults_429: float = 0.004
    hangs: float = 0.0003  # each holds a caller for upstream.read_timeout: few
    stream_resets: float = 0.03  # shares of the streams
    stream_500: float = 0.02
    embeddings_share: float = 0.25

    def plan(self, rng: random.Random, first_index: int = 0) -> list[Op]:
        def count(share: float, of: int) -> int:
            return round(share * of)

        requests: list[tuple[str | None, bool]] = (
            [("500", False)] * count(self.faults_500, self.requests)
            + [("429", False)] * count(self.faults_429, self.requests)
            + [("hang", False)] * count(self.hangs, self.requests)
        )
        requests += [(None, False)] * (self.requests - len(requests))
        streams: list[tuple[str | None, bool]] = [("reset", False)] * count(self.stream_resets, self.streams) + [
            ("500", False)
        ] * count(self.stream_500, self.streams)
        streams += [(None, True)] * count(self.abandon_share, self.streams)
        streams += [(None, False)] * (self.streams - len(streams))
        shapes = [("request", f, a) for f, a in requests] + [("stream", f, a) for f, a in streams]
        rng.shuffle(shapes)
        ops = []
        for offset, (shape, fault, abandon) in enumerate(shapes):
            if shape == "stream":
                kind = "stream"
            else:
                kind = "embeddings" if rng.random() < self.embeddings_share else "chat"
            ops.append(Op(first_index + offset, kind, fault, abandon))
        return ops


@dataclass
class Tally:
    """What came back: outcomes per (kind, fault, outcome), the unexpected ones in detail, latencies."""

    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    unexpected_count: int = 0
    requests_done: int = 0
    streams_done: int = 0
    connections_opened: int = 0
    request_seconds: list[float] = field(default_factory=list)

    def record(self, op: Op, outcome: str, seconds: float) -> None:
        expected = outcome.startswith("ok")
        self.outcomes[(op.kind, op.fault or "-", outcome if expected else "unexpected")] += 1
        if not expected:
            self.unexpected_count += 1
            if len(self.unexpected) < 20:
                self.unexpected.append(f"{op}: {outcome}")
        if op.kind == "stream":
            self.streams_done += 1
        else:
            self.requests_done += 1
            if op.fault is None:
                self.request_seconds.append(seconds)


class Conn:
    """One kept-alive connection to the sidecar."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()  # a FIN after what is buffered, as a client pool closing an idle connection

    def abort(self) -> None:
        self.writer.transport.abort()  # gone at once, unread bytes and all: a caller that left mid-answer

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body(self, headers: dict[bytes, bytes]) -> bytes:
        if b"content-length" in headers:
            return await self.reader.readexactly(int(headers[b"content-length"]))
        parts = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def chunk(self) -> bytes:
        """The next chunk of a chunked body, b"" for the last one."""
        size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        data = await self.reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise ValueError("a chunk without its CRLF")
        return data[:-2]


async def exchange(conn: Conn, op: Op, port: int) -> tuple[str, bool]:
    """Send `op` and judge the answer: ("ok..." or what went wrong, whether the connection can be kept)."""
    conn.writer.write(op.request(port))
    try:
        status, headers = await conn.head()
    except _NETWORK_ERRORS as exc:
        return f"no answer: {type(exc).__name__}", False
    keep = headers.get(b"connection", b"").lower() != b"close"
    if op.kind == "stream" and status == 200 and op.fault in (None, "reset"):
        return await _stream(conn, op)
    try:
        body = await conn.body(headers)
    except _NETWORK_ERRORS as exc:
        return f"{status} and a broken body: {type(exc).__name__}", False
    wanted = {None: 200, "500": 500, "429": 429, "hang": 504}.get(op.fault)
    if status != wanted:
        return f"status {status}, wanted {wanted}: {body[:200]!r}", keep
    if status == 200 and not _looks_right(op, body):
        return f"200 with an unexpected body: {body[:200]!r}", keep
    if op.fault == "500" and b"soak fault" not in body:
        return f"500 without the upstream's body: {body[:200]!r}", keep
    if op.fault == "hang" and b"UpstreamTimeout" not in body:
        return f"504 without the sidecar's timeout error: {body[:200]!r}", keep
    if op.fault == "429" and b"retry-after" not in headers:
        return "429 without Retry-After", keep
    return f"ok {status}", keep


def _looks_right(op: Op, body: bytes) -> bool:
    if op.kind == "embeddings":
        return b'"embedding"' in body and b'"object": "list"' in body
    return b'"chat.completion"' in body


async def _stream(conn: Conn, op: Op) -> tuple[str, bool]:
    done = False
    try:
        while chunk := await conn.chunk():
            if op.abandon and b"data:" in chunk:
                return "ok abandoned", False
            done = done or b"data: [DONE]" in chunk
    except _NETWORK_ERRORS as exc:
        if op.fault == "reset":
            return "ok cut", False  # scripted: the upstream reset mid-stream, the sidecar cut the caller off
        return f"stream broken: {type(exc).__name__}", False
    if op.fault == "reset":
        return "a stream scripted to be cut ended cleanly", True
    return ("ok streamed", True) if done else ("stream ended without [DONE]", True)


async def worker(port: int, queue: asyncio.Queue[Op | None], tally: Tally, rng: random.Random) -> None:
    """Takes operations until a None; keeps its connection for 50-250 calls, as a client pool would."""
    conn: Conn | None = None
    uses_left = 0
    try:
        while (op := await queue.get()) is not None:
            started = time.perf_counter()
            if conn is None:
                try:
                    conn = await asyncio.wait_for(Conn.open(port), OP_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    tally.record(op, f"connect: {type(exc).__name__}", 0.0)
                    continue
                tally.connections_opened += 1
                uses_left = rng.randint(50, 250)
            try:
                outcome, keep = await asyncio.wait_for(exchange(conn, op, port), OP_TIMEOUT)
            except TimeoutError:
                outcome, keep = f"no answer within {OP_TIMEOUT} s", False
            tally.record(op, outcome, time.perf_counter() - started)
            uses_left -= 1
            if not keep or uses_left <= 0:
                if keep:
                    conn.close()
                else:
                    conn.abort()
                conn = None
    finally:
        if conn is not None:
            conn.close()
