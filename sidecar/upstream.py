"""The upstream transport: aiohttp's ClientSession behind the small interface the proxy needs.

Like httpx's client/transport split: the proxy (sidecar/proxy.py) decides what to send and how to answer;
this module only moves bytes to the one upstream origin and back, untouched — no redirects, no cookies, no
decompression, an egress proxy only as config resolved it (network) — and turns aiohttp's exceptions into the
few failures the proxy answers differently (502 unreachable, 504 silent, a broken stream).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

# aiohttp would add these itself; the upstream must see only what the caller sent (plus our token)
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


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
        self._base = url.rstrip("/")
        # the egress proxy for this origin (network.proxy / HTTPS_PROXY; None: direct). An https upstream is
        # reached through a CONNECT tunnel and still verified with the pool's own TLS context (tls.ca_bundle).
        self._proxy = proxy
        base = URL(self._base)
        self._origin = (base.scheme, base.raw_host, base.port)
        self._under = base.raw_path.rstrip("/") + "/"  # every request path starts with the base path and a slash
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
        url = URL(self._base + path_qs, encoded=True)  # byte-for-byte: no re-encoding, no normalising
        if (url.scheme, url.raw_host, url.port) != self._origin or not url.raw_path.startswith(self._under):
            raise OffOrigin("the request target does not stay on the upstream's origin and base path")
        try:
            response = await self._session.request(
                method,
                url,
                headers=outgoing,
                data=(body or None) if body is not None else stream,
                allow_redirects=False,  # a redirect goes back to the caller; our token never follows it
                proxy=self._proxy,
            )
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(exc.os_error) from None
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout("connecting to the upstream timed out") from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise ReadTimeout("the upstream sent no response within upstream.read_timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(str(exc)) from None
        except ValueError:  # aiohttp refuses to serialise the head: a non-UTF-8 or multi-line header value
            raise Unsendable("a request header value is not UTF-8 text or holds a line break") from None
        return Response(response)

    async def close(self) -> None:
        await self._session.close()
