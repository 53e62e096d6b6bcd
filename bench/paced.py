"""Requests spaced out in time on one kept-alive connection: what sparse real traffic sees.

wrk sends the next request the moment an answer arrives, which keeps every process on the path hot. An
application calling a model now and then does not: between its requests the sidecar sleeps and the caches
go cold. This measures the same chat request with a pause before each one.
"""

from __future__ import annotations

import asyncio
import time

import load

CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words."}]}'


def _request(port: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {load.CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(CHAT_BODY)}\r\n\r\n"
    )
    return head.encode() + CHAT_BODY


def _complete(seen: bytes) -> bool:
    """A whole response with a Content-Length body (the static upstream always sends one)."""
    end = seen.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in seen[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(seen) >= end + 4 + int(value)
    raise RuntimeError("a response without Content-Length")


async def paced(port: int, *, token: str | None, gap: float, count: int, timeout: float = 10.0) -> list[float]:
    """`count` requests on one connection with `gap` seconds before each; the seconds each one took."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    request = _request(port, token)
    times: list[float] = []
    try:
        for _ in range(count):
            await asyncio.sleep(gap)
            started = time.perf_counter()
            writer.write(request)
            seen = b""
            while not _complete(seen):
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
                if not chunk:
                    raise RuntimeError(f"port {port}: the connection closed mid-response")
                seen += chunk
            if not seen.startswith(b"HTTP/1.1 200"):
                status_line = seen.split(b"\r\n", 1)[0]
                raise RuntimeError(f"port {port}: {status_line!r}")
            times.append(time.perf_counter() - started)
    finally:
        writer.transport.abort()
    return times
