"""A response from the upstream: its head, and its body as it arrives."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.upstream.connection import Connection

HIGH_WATER = 256 * 1024  # body bytes held for a slow caller before the upstream socket is paused


class Body:
    """Body bytes in arrival order; the reader waits for more, the connection pauses when too much waits."""

    __slots__ = ("_chunks", "_conn", "_eof", "_error", "_loop", "_size", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: Connection | None) -> None:
        self._loop = loop
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = conn is None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self._eof = True
        self._error = error
        self._conn = None
        self._wake()

    @property
    def done(self) -> bool:
        return self._eof and self._error is None

    @property
    def ended(self) -> bool:
        """The body ended cleanly and every byte of it has been taken."""
        return self._eof and self._error is None and not self._chunks

    def ready(self) -> bytes:
        """Whatever has arrived and not been taken yet, without waiting (b"" if nothing)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next(self) -> bytes:
        """The next bytes, b"" at the end; raises the error that cut the body short."""
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        return data


class Response:
    """A response head; the body follows through `chunks()` or `read()`."""

    __slots__ = ("_body", "_conn", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: Body, conn: Connection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received, names in their original case, repeats kept
        self._body = body
        self._conn: Connection | None = conn

    async def chunks(self) -> AsyncIterator[bytes]:
        body = self._body
        while True:
            data = await body.next()
            if not data:
                return
            yield data

    def ready(self) -> bytes:
        """Body bytes already here, without waiting (small answers arrive with their head)."""
        return self._body.ready()

    async def next(self) -> bytes:
        """The next body bytes, b"" at the end; raises the error that cut the body short."""
        return await self._body.next()

    @property
    def ended(self) -> bool:
        """Every byte of the body has been taken and it ended cleanly."""
        return self._body.ended

    async def read(self) -> bytes:
        parts = [data async for data in self.chunks()]
        return b"".join(parts)

    def close(self) -> None:
        """Done with the response: an unfinished exchange closes its connection (finished ones were pooled)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._body.done:
            conn.abandon(self._body)
