"""One upstream connection: an asyncio Protocol that sends a request and parses the answer as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

from sidecar.upstream.errors import ConnectionLost, ProtocolError, ReadTimeout, UpstreamError
from sidecar.upstream.response import Body, Response
from sidecar.upstream.wire import CHUNKED, LENGTH, MAX_HEAD, NONE, UNTIL_CLOSE, ChunkedDecoder, parse_head

if TYPE_CHECKING:
    from sidecar.upstream.pool import Pool


class Connection(asyncio.Protocol):
    """One upstream connection and the exchange in flight on it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self.reused = False
        self.idle_since = 0.0
        # the exchange in flight
        self._method = ""
        self._head = b""
        self._head_waiter: asyncio.Future[Response] | None = None
        self._body: Body | None = None
        self._framing = 0  # LENGTH, CHUNKED or UNTIL_CLOSE once the head is parsed
        self._left = 0  # body bytes still expected (Content-Length framing)
        self._chunks = ChunkedDecoder()
        self._keep_alive = False
        self.received = False
        self._sent = True  # False while a streamed request body is still going out
        self._paused = False
        self._last_read = 0.0
        self._drain: asyncio.Future[None] | None = None
        self.upload: asyncio.Future[None] | None = None  # a streamed request body going out

    # -- transport callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each SSE event leaves at once

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._pool.forget(self)
        lost = ConnectionLost(f"the upstream closed the connection{f' ({exc})' if exc else ''}")
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(lost)
        body, self._body = self._body, None
        if body is not None:
            body.finish(None if self._framing == UNTIL_CLOSE else lost)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(lost)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost settles the exchange

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self.received = True
        if self._body is not None:
            self._body_data(data)
        elif self._head_waiter is not None:
            self._head_data(data)
        else:  # bytes nobody asked for on an idle connection: it cannot be trusted again
            self.kill()

    # -- the exchange -----------------------------------------------------------------------------

    def start(self, method: str, head: bytes, body: bytes | None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._method = method
        self._head = b""
        self.received = False
        self._sent = body is not None
        self._head_waiter = waiter = self._loop.create_future()
        self._last_read = self._loop.time()
        self.transport.write(head + body if body else head)
        return waiter

    async def send_stream(self, stream: Readable, length: int | None) -> None:
        """Stream a request body: exactly `length` bytes, or chunked when the length is unknown."""
        assert self.transport is not None
        transport = self.transport
        sent = 0
        while True:
            data = await stream.readany()
            if not data or not self.alive:
                break
            if length is None:
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                transport.write(data)
            sent += len(data)
            self._last_read = self._loop.time()  # progress: the upstream is not idle while we still send
            if length is not None and sent >= length:
                break  # marked sent before any drain: the answer may follow right away
            if self._drain is not None:
                await self._drain
        if not self.alive:
            return
        if length is None:
            transport.write(b"0\r\n\r\n")
        elif sent != length:
            raise ConnectionLost(f"the caller sent {sent} of {length} body bytes")
        self._sent = True

    def _head_data(self, data: bytes) -> None:
        buffer = self._head + data if self._head else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._fail(ProtocolError("the upstream's response head is too large"))
                else:
                    self._head = buffer
                return
            try:
                status, reason, headers, framing, length, keep_alive = parse_head(buffer[:end], self._method)
            except ProtocolError as exc:
                self._fail(exc)
                return
            buffer = buffer[end + 4 :]
            if status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: the real answer follows
            break
        self._head = b""
        self._keep_alive = keep_alive
        self._framing = framing
        self._left = length
        if framing == CHUNKED:
            self._chunks = ChunkedDecoder()
        waiter, self._head_waiter = self._head_waiter, None
        if framing == NONE:
            if buffer:
                self._keep_alive = False  # bytes after a bodiless answer: this connection is out of step
            body = Body(self._loop, None)
            response = Response(status, reason, headers, body, self)
            if waiter is not None and not waiter.done():
                waiter.set_result(response)
            self._finished()
            return
        self._body = body = Body(self._loop, self)
        response = Response(status, reason, headers, body, self)
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if buffer:
            self._body_data(buffer)

    def _body_data(self, data: bytes) -> None:
        body = self._body
        assert body is not None
        framing = self._framing
        if framing == LENGTH:
            if len(data) >= self._left:
                extra = len(data) > self._left
                body.feed(data[: self._left] if extra else data)
                self._left = 0
                if extra:  # bytes past the declared length: this connection is out of step
                    self._keep_alive = False
                self._finished()
            else:
                body.feed(data)
                self._left -= len(data)
        elif framing == CHUNKED:
            decoder = self._chunks
            try:
                payload = decoder.feed(data)
            except ProtocolError as exc:
                self._fail(exc)
                return
            if payload:
                body.feed(payload)
            if decoder.done:
                if decoder.extra:  # bytes after the last chunk: this connection is out of step
                    self._keep_alive = False
                self._finished()
        else:
            body.feed(data)

    def _finished(self) -> None:
        """The response is complete on the wire: hand the body its end, pool the connection if clean."""
        body, self._body = self._body, None
        self._framing = 0
        if body is not None:
            body.finish()
        if self._paused:
            self.resume()
        # an upload still going out (the answer came early) leaves the connection out of step: close it
        if self._keep_alive and self._sent and self.alive:
            self._pool.put(self)
        else:
            self.kill()

    def _fail(self, error: UpstreamError) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        body, self._body = self._body, None
        if body is not None:
            body.finish(error)
        self.kill()

    def abandon(self, body: Body) -> None:
        """The caller left before the end: nothing more is read; the connection is closed."""
        if self._body is body:
            self._body = None
            self.kill()

    def kill(self) -> None:
        self.alive = False
        upload, self.upload = self.upload, None
        if upload is not None and not upload.done():
            upload.cancel()
        self._pool.forget(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- flow control and the read timeout ----------------------------------------------------------

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()  # time spent waiting for the caller is not upstream idleness
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def check_idle(self, now: float, timeout: float) -> None:
        """Fail the exchange if the upstream has sent nothing for `timeout` seconds (the pool's watchdog)."""
        if self._paused or (self._head_waiter is None and self._body is None):
            return
        if now - self._last_read >= timeout:
            self._fail(ReadTimeout("the upstream sent nothing within upstream.read_timeout"))


class Readable:
    """What a streamed request body offers (aiohttp's StreamReader)."""

    async def readany(self) -> bytes: ...
