"""The upstream transport: aiohttp's ClientSession behind the small interface the proxy needs.

Like httpx's client/transport split: the proxy (sidecar/proxy.py) and the WebSocket relay
(sidecar/websocket.py) decide what to send and how to answer; this module only moves bytes to the one
upstream origin and back, untouched — no redirects, no cookies, no decompression, an egress proxy only as
config resolved it (network) — and turns aiohttp's exceptions into the few failures the proxy answers
differently (502 unreachable, 504 silent, a broken stream).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterable
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

# aiohttp would add these itself; the upstream must see only what the caller sent (plus our token)
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# WebSockets. One message is held whole while it passes (aiohttp reassembles fragments): well above any Realtime
# event, and the bound on what a peer can make the sidecar hold per direction.
WS_MAX_MESSAGE = 16 * 1024 * 1024
# Pings on both legs: a caller that vanished without a FIN is noticed, and the upstream leg never looks idle to
# the load balancers in front of it (Azure's drop idle connections after about 4 minutes).
WS_HEARTBEAT = 30.0
WS_CLOSE_TIMEOUT = 2.0  # how long a peer gets to answer a close frame before its socket is closed anyway
_WS_REFUSAL_BODY = 64 * 1024  # what is kept of an upstream's answer to an upgrade that was not 101


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class ConnectError(UpstreamError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    pass


class Unsendable(UpstreamError):
    """The request cannot be sent as the caller wrote it (a header value that is not UTF-8 or holds a line
    break): the caller's fault, answered with 400 before a byte leaves."""


class OffOrigin(Unsendable):
    """The URL built for a request is not on the upstream's origin or under its base path. The request gate
    (sidecar/gate.py) already refuses such targets; this is the second lock on the same door."""


class Origin:
    """`upstream.url`'s scheme, host, port and base path: the one place URLs to the upstream are built, and
    checked. Every way of talking to the upstream (requests, WebSockets) goes through `url_for`."""

    __slots__ = ("_base", "_origin", "_under")

    def __init__(self, url: str) -> None:
        self._base = url.rstrip("/")
        base = URL(self._base)
        self._origin = (base.scheme, base.raw_host, base.port)
        self._under = base.raw_path.rstrip("/") + "/"  # every request path starts with the base path and a slash

    def url_for(self, path_qs: str) -> URL:
        """The caller's raw path and query appended to the base URL byte-for-byte (no re-encoding, no
        normalising); OffOrigin if the result is not on the upstream's origin and under its base path."""
        url = URL(self._base + path_qs, encoded=True)
        if not self.holds(url):
            raise OffOrigin("the request target does not stay on the upstream's origin and base path")
        return url

    def holds(self, url: URL) -> bool:
        return (url.scheme, url.raw_host, url.port) == self._origin and url.raw_path.startswith(self._under)


def upstream_error(exc: Exception) -> UpstreamError:
    """What aiohttp raised while sending to the upstream, as the failure the caller is answered with."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(exc.os_error)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout("connecting to the upstream timed out")
    if isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        return ReadTimeout("the upstream sent no response within upstream.read_timeout")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamError(str(exc))
    # aiohttp refuses to serialise the head (ValueError): a non-UTF-8 or multi-line header value
    return Unsendable("a request header value is not UTF-8 text or holds a line break")


class Response:
    """A response head; the body follows as it arrives through `ready()`/`next()`, or whole with `read()`."""

    __slots__ = ("_content", "_response", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: list[tuple[str, str]] = list(response.headers.items())

    def ready(self) -> bytes:
        """Body bytes already here, without waiting (small answers arrive with their head)."""
        try:
            return self._content.read_nowait()
        except aiohttp.ClientError as exc:
            raise ConnectionLost(f"the upstream broke the response off: {exc}") from None

    async def next(self) -> bytes:
        """The next body bytes, b"" at the end; raises ConnectionLost/ReadTimeout if the body is cut short."""
        try:
            return await self._content.readany()
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise ReadTimeout("the upstream went silent past upstream.read_timeout") from None
        except aiohttp.ClientError as exc:
            raise ConnectionLost(f"the upstream broke the response off: {exc}") from None

    @property
    def ended(self) -> bool:
        """Every byte of the body has been taken and it ended cleanly."""
        return self._content.at_eof() and self._content.exception() is None

    async def read(self) -> bytes:
        parts = []
        while data := await self.next():
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the response: an unfinished exchange closes its connection (finished ones were pooled)."""
        self._response.close()


class Send(Protocol):
    """Pool.request's shape: what the proxy calls for each upstream request (tracing wraps it)."""

    async def __call__(
        self,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | None,
        stream: aiohttp.StreamReader | None = None,
        stream_length: int | None = None,
    ) -> Response: ...


class Pool:
    """The app's one long-lived session to the upstream origin (created when the app starts: it needs a loop)."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
        proxy: str | None = None,
    ) -> None:
        self._origin = Origin(url)
        # the egress proxy for this origin (network.proxy / HTTPS_PROXY; None: direct). An https upstream is
        # reached through a CONNECT tunnel and still verified with the pool's own TLS context (tls.ca_bundle).
        self._proxy = proxy
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # streams are long: a pool cap would queue callers behind them
                ssl=ssl_context,
                keepalive_timeout=keepalive_timeout,
            ),
            auto_decompress=False,  # bytes pass untouched, Content-Encoding included
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=connect_timeout,
                sock_read=read_timeout,  # idle time between bytes, never a total
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies must never reach another's request
            trust_env=False,  # the environment's proxy settings come through config (network), never implicitly
            skip_auto_headers=_NO_AUTO_HEADERS,
        )

    async def request(
        self,
        method: str,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        *,
        body: bytes | None,
        stream: aiohttp.StreamReader | None = None,
        stream_length: int | None = None,
    ) -> Response:
        """Send one request; `path_qs` is the caller's raw path and query, appended to the base URL as is."""
        outgoing = CIMultiDict(headers)
        if body is None and stream_length is not None:
            outgoing["Content-Length"] = str(stream_length)  # a known length streams as is, not chunked
        url = self._origin.url_for(path_qs)
        try:
            response = await self._session.request(
                method,
                url,
                headers=outgoing,
                data=(body or None) if body is not None else stream,
                allow_redirects=False,  # a redirect goes back to the caller; our token never follows it
                proxy=self._proxy,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise upstream_error(exc) from None
        return Response(response)

    async def close(self) -> None:
        await self._session.close()


class HandshakeRefused(UpstreamError):
    """The upstream answered the upgrade with something other than 101 (what it said is kept, bounded)."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"the upstream answered the WebSocket upgrade with HTTP {status}")
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


class UpstreamSockets:
    """aiohttp's WebSocket client, for the upstream's origin only, without redirects.

    A session of its own: its one middleware sees every handshake (checked against the origin once more) and
    stops at any answer that is not 101 — aiohttp's ws_connect would follow a redirect itself.
    """

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout: float,
        read_timeout: float,
        proxy: str | None = None,
    ) -> None:
        self._origin = Origin(url)
        self._proxy = proxy  # as for Pool: network.proxy / HTTPS_PROXY for this origin, None: direct
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            middlewares=(self._handshake_only,),
        )

    async def connect(
        self, path_qs: str, headers: list[tuple[str, str]], protocols: list[str]
    ) -> aiohttp.ClientWebSocketResponse:
        url = self._origin.url_for(path_qs)
        try:
            return await self._session.ws_connect(
                url,
                headers=CIMultiDict(headers),
                protocols=protocols,
                autoclose=False,  # a close frame is the relay's to pass on, with its code
                autoping=True,
                heartbeat=WS_HEARTBEAT,
                max_msg_size=WS_MAX_MESSAGE,
                compress=0,
                decode_text=False,  # text passes as the bytes it was: no decoding and encoding again
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT),
                proxy=self._proxy,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise upstream_error(exc) from None

    async def _handshake_only(
        self, request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        if not self._origin.holds(request.url):
            raise OffOrigin("the WebSocket target does not stay on the upstream's origin and base path")
        response = await handler(request)
        if response.status == 101:
            return response
        try:
            body = await _bounded_body(response)
        finally:
            response.close()
        raise HandshakeRefused(response.status, response.reason or "", list(response.headers.items()), body)

    async def close(self) -> None:
        await self._session.close()


async def _bounded_body(response: aiohttp.ClientResponse) -> bytes:
    parts: list[bytes] = []
    size = 0
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        while size < _WS_REFUSAL_BODY and (data := await response.content.read(_WS_REFUSAL_BODY - size)):
            parts.append(data)
            size += len(data)
    return b"".join(parts)
