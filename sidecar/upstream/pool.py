"""Kept-alive connections to the one upstream, and sending a request on one of them."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

from sidecar.upstream.connection import Connection, Readable
from sidecar.upstream.errors import ConnectError, ConnectionLost, ConnectTimeout, ProtocolError, UpstreamError
from sidecar.upstream.response import Response

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: connect address, TLS context, the Host header and the base path to prefix."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str
    base_path: str

    @classmethod
    def from_url(cls, url: str, ssl_context: ssl.SSLContext | None) -> Origin:
        parsed = URL(url)
        assert parsed.host is not None and parsed.port is not None, "config validates upstream.url"
        return cls(
            host=parsed.host,
            port=parsed.port,
            ssl=ssl_context if parsed.scheme == "https" else None,
            host_header=parsed.host_port_subcomponent or parsed.host,
            base_path=parsed.raw_path.rstrip("/"),
        )


class Pool:
    """Kept-alive connections to one origin, most recently used first."""

    def __init__(
        self,
        origin: Origin,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
        max_idle: int = 256,
    ) -> None:
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive_timeout
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # One watchdog for every busy connection instead of a timer per request (a timer per request showed
        # in the profile); a read timeout fires up to a quarter of itself (at most 1 s) late.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_every = min(1.0, read_timeout / 4)
        self._closed = False
        self._request_prefix = f" {origin.base_path}"
        self._host_line = f"Host: {origin.host_header}\r\n"

    # -- connections --------------------------------------------------------------------------------

    async def _connect(self) -> Connection:
        origin = self.origin
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout("connecting to the upstream timed out") from None
        except OSError as exc:  # refused, unreachable, TLS verification (ssl.SSLError is an OSError)
            raise ConnectError(exc) from None
        return conn

    def _take_idle(self) -> Connection | None:
        """The most recently used idle connection that is still open (no await: the usual case)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.alive and transport is not None and not transport.is_closing():
                conn.reused = True
                self._busy.add(conn)
                self._watch()
                return conn
        return None

    async def _open(self) -> Connection:
        conn = await self._connect()
        if self._closed:
            conn.kill()
            raise ConnectionLost("the sidecar is shutting down")
        self._busy.add(conn)
        self._watch()
        return conn

    def _watch(self) -> None:
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self._watch_every, self._check_busy)

    def _check_busy(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        for conn in list(self._busy):
            conn.check_idle(now, self.read_timeout)
        if self._busy:
            self._watch()

    def put(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if self._closed or len(self._idle) >= self._max_idle:
            conn.kill()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive / 2, self._sweep)

    def forget(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout (oldest are at the front)."""
        self._sweeper = None
        cutoff = self.loop.time() - self._keepalive
        while self._idle and self._idle[0].idle_since < cutoff:
            self._idle.pop(0).kill()
        if self._idle:
            self._sweeper = self.loop.call_later(self._keepalive / 2, self._sweep)

    async def close(self) -> None:
        self._closed = True
        for timer in (self._sweeper, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._watchdog = None
        for conn in [*self._idle, *self._busy]:
            conn.kill()
        self._idle.clear()
        self._busy.clear()

    # -- requests -----------------------------------------------------------------------------------

    def _head(self, method: str, path_qs: str, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
        lines = [method, self._request_prefix, path_qs, " HTTP/1.1\r\n", self._host_line]
        count = 2
        for name, value in headers:
            lines += (name, ": ", value, "\r\n")
            count += 1
        lines.append(framing)
        text = "".join(lines)
        # a CR or LF inside a name or value would split it into a header of the caller's choosing
        expected = count + framing.count("\n")
        if text.count("\n") != expected or text.count("\r") != expected:
            raise ProtocolError("refusing a header with a line break in it")
        return text.encode("utf-8", "surrogateescape")

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | None,
        stream: Readable | None = None,
        stream_length: int | None = None,
    ) -> Response:
        """Send one request and return once the response head is in. `body` is sent whole; otherwise
        `stream` is, with `stream_length` bytes or chunked."""
        if body is not None:
            if body or method not in _BODYLESS_METHODS:
                framing = f"Content-Length: {len(body)}\r\n\r\n"
            else:
                framing = "\r\n"
        elif stream_length is not None:
            framing = f"Content-Length: {stream_length}\r\n\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n\r\n"
        head = self._head(method, path_qs, headers, framing)
        retry_allowed = body is not None and (method in _IDEMPOTENT)
        while True:
            conn = self._take_idle() or await self._open()
            waiter = conn.start(method, head, body)
            try:
                if body is not None:
                    return await waiter  # kept flat: every await level costs on each resume
                return await self._streamed(conn, waiter, stream, stream_length)  # type: ignore[arg-type]
            except ConnectionLost:
                _drop(conn, waiter)
                # a kept-alive connection the upstream had just closed: one fresh try if replaying is safe
                if conn.reused and not conn.received and retry_allowed:
                    retry_allowed = False
                    continue
                raise
            except BaseException:
                _drop(conn, waiter)
                raise

    async def _streamed(
        self, conn: Connection, waiter: asyncio.Future[Response], stream: Readable, length: int | None
    ) -> Response:
        """Send the body from `stream` while waiting for the answer."""
        upload = conn.upload = asyncio.ensure_future(conn.send_stream(stream, length))
        upload.add_done_callback(_consume)
        try:
            await asyncio.wait({waiter, upload}, return_when=asyncio.FIRST_COMPLETED)
            if upload.done() and not upload.cancelled() and upload.exception() is not None and not waiter.done():
                error = upload.exception()
                if isinstance(error, UpstreamError):
                    raise error
                raise UpstreamError(f"the caller's request body could not be passed on ({error!r})") from error
            response = await waiter
        except BaseException:
            upload.cancel()
            raise
        # an answer that came before the whole body went out (an early 401 or 413) leaves the upload going
        # on while the caller reads; it ends with the connection, which is then closed rather than pooled
        return response


def _drop(conn: Connection, waiter: asyncio.Future[Response]) -> None:
    """The request was given up (cancelled, failed): a head that did arrive must not pin the connection."""
    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
        waiter.result().close()
    else:
        waiter.cancel()
        conn.kill()


def _consume(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
