"""The forwarding handler: headers in, a bearer token on, the body streamed both ways, errors in the
Azure OpenAI shape.

One Proxy per app; it owns the long-lived upstream client session. It asks the Authorizer for a token and
knows nothing of flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.errors import error_response, identity_error_response
from sidecar.metrics import Metrics
from sidecar.routes import route_family
from sidecar.tokens.base import Authorizer, IdentityError
from sidecar.tokens.claims import unverified_claims

log = logging.getLogger("sidecar.proxy")
access_log = logging.getLogger("sidecar.access")

# RFC 9110 hop-by-hop headers, plus those that must never travel upstream from the caller.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_DROP_FROM_CALLER = HOP_BY_HOP | {"host", "authorization", "api-key", "expect"}
_DROP_FROM_UPSTREAM = HOP_BY_HOP
# A body this small is kept in memory so the request can be replayed once after an upstream 401.
REPLAYABLE_BODY = 1024 * 1024
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(slots=True)
class Exchange:
    """What the access log and the metrics want to know about one proxied request."""

    started: float = field(default_factory=time.monotonic)
    route: str = "other"
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0


EXCHANGE = web.RequestKey("exchange", Exchange)


def filter_headers(headers: Mapping[str, str], drop: frozenset[str] | set[str]) -> CIMultiDict[str]:
    """Copy headers minus `drop` and whatever the Connection header names as hop-by-hop."""
    listed = {
        token.strip().lower()
        for value in _all(headers, "Connection")
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in drop and lowered not in listed:
            out.add(name, value)
    return out


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, ()))
    value = headers.get(name)
    return [value] if value is not None else []


class Proxy:
    def __init__(
        self,
        *,
        upstream_url: str,
        authorizer: Authorizer,
        metrics: Metrics,
        extra_headers: Mapping[str, str] | None = None,
        audience: str = "",
    ) -> None:
        self._base = upstream_url.rstrip("/")
        self._authorizer = authorizer
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics
        self._extra_headers = dict(extra_headers or {})
        self._audience = audience

    def attach(self, session: aiohttp.ClientSession) -> None:
        """The app's one long-lived upstream session, created when the app starts (it needs a loop)."""
        self._session = session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = Exchange(route=route_family(request.path))
        request[EXCHANGE] = exchange
        try:
            return await self._forward(request, exchange)
        except IdentityError as exc:
            return identity_error_response(exc)
        except _UpstreamFailure as exc:
            return exc.response

    async def _forward(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        # raw_path keeps the caller's encoding and query byte-for-byte (api-version, repeated keys)
        target = URL(self._base + request.raw_path, encoded=True)
        headers = filter_headers(request.headers, _DROP_FROM_CALLER)
        headers.update(self._extra_headers)

        body = await self._replayable_body(request)
        token = await self._authorizer.token_for(request.headers)
        upstream = await self._send(request, target, headers, token, body, exchange)
        if upstream.status == 401 and body is not None:
            await _discard(upstream)
            log.info("upstream answered 401; refreshing the token and replaying once")
            token = await self._authorizer.token_after_rejection(request.headers, token)
            upstream = await self._send(request, target, headers, token, body, exchange)
        exchange.upstream_status = upstream.status
        if upstream.status == 401:
            replaced = await self._explain_empty_401(upstream, token)
            if replaced is not None:
                return replaced
        return await self._relay(request, upstream, exchange)

    async def _replayable_body(self, request: web.Request) -> bytes | None:
        """Small bodies are read so a 401 can be replayed; large or chunked ones stream (returns None)."""
        if not request.body_exists:
            return b""
        length = request.content_length
        if length is not None and length <= REPLAYABLE_BODY:
            return await request.read()
        return None

    async def _send(
        self,
        request: web.Request,
        target: URL,
        headers: CIMultiDict[str],
        token: str,
        body: bytes | None,
        exchange: Exchange,
    ) -> aiohttp.ClientResponse:
        headers["Authorization"] = "Bearer " + token
        sent = time.monotonic()
        assert self._session is not None, "Proxy.attach() is called when the app starts"
        try:
            upstream = await self._session.request(
                request.method,
                target,
                headers=headers,
                data=body if body is not None else request.content,
                allow_redirects=False,  # a redirect goes back to the caller; our token never follows it
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
        except aiohttp.ClientConnectorError as exc:
            raise _UpstreamFailure(
                502, "UpstreamUnreachable", f"cannot connect to the upstream: {exc.os_error}"
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise _UpstreamFailure(502, "UpstreamUnreachable", "connecting to the upstream timed out") from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise _UpstreamFailure(
                504, "UpstreamTimeout", "the upstream sent no response within upstream.read_timeout"
            ) from None
        except aiohttp.ClientError as exc:
            raise _UpstreamFailure(502, "UpstreamError", f"the upstream connection failed: {exc}") from None
        exchange.bytes_in = len(body) if body is not None else (request.content_length or 0)
        self._metrics.upstream_ttfb.labels(exchange.route).observe(time.monotonic() - sent)
        return upstream

    async def _explain_empty_401(self, upstream: aiohttp.ClientResponse, token: str) -> web.Response | None:
        """App Service authentication answers 401 with no body; say what is most likely wrong instead."""
        body = await upstream.read()
        upstream.release()
        if body.strip():
            response = web.Response(status=401, body=body)
            response.headers.extend(filter_headers(upstream.headers, _DROP_FROM_UPSTREAM | {"content-length"}))
            return response
        audience = unverified_claims(token).get("aud") or self._audience or "unknown"
        return error_response(
            401,
            "UpstreamUnauthorized",
            f"the upstream rejected the sidecar's token (issued for audience {audience!r}). Check that auth.scope "
            "names the upstream's Application ID URI and that the identity has the app role or scope it needs.",
            retryable=False,
        )

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, exchange: Exchange
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(filter_headers(upstream.headers, _DROP_FROM_UPSTREAM))
        metrics = self._metrics
        metrics.active_streams.inc()
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # each SSE event goes out as soon as it arrives
                exchange.bytes_out += len(chunk)
            await response.write_eof()
        except (aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError, aiohttp.ClientConnectionError,
                TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectionResetError | ConnectionResetError) and _caller_gone(request):
                raise asyncio.CancelledError from None  # the caller left; nothing to tell it
            # Headers are out: the only honest signal left is to cut the connection without a clean end.
            log.warning("upstream failed mid-response (%s); aborting the caller's connection", type(exc).__name__)
            _abort(request)
        finally:
            upstream.close()  # close, not release: a caller that left must close the upstream stream too
            metrics.active_streams.dec()
            metrics.bytes_out.inc(exchange.bytes_out)
            metrics.upstream_latency.labels(exchange.route).observe(time.monotonic() - exchange.started)
        return response


class _UpstreamFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message, retryable=True)


async def _discard(upstream: aiohttp.ClientResponse) -> None:
    with contextlib.suppress(aiohttp.ClientError):
        await upstream.read()
    upstream.release()


def _caller_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
