"""The forwarding handler: headers in, a bearer token on, the body streamed both ways, errors in the
Azure OpenAI shape.

One Proxy per app; it sends through the app's upstream transport (sidecar/upstream.py, aiohttp's client).
It asks the Authorizer for a token and knows nothing of flows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.claims import unverified_claims
from sidecar.errors import error_response, identity_error_response
from sidecar.metrics import Metrics
from sidecar.routes import route_family
from sidecar.tokens.base import Authorizer, IdentityError
from sidecar.upstream import (
    ConnectError,
    ConnectTimeout,
    OffOrigin,
    Pool,
    ReadTimeout,
    Response,
    Unsendable,
    UpstreamError,
)

log = logging.getLogger("sidecar.proxy")

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
# content-length too: the transport frames the body it sends itself (same length, or chunked when unknown)
_DROP_FROM_CALLER = HOP_BY_HOP | {"host", "authorization", "api-key", "expect", "content-length"}
_DROP_FROM_UPSTREAM = HOP_BY_HOP
# A body this small is kept in memory so the request can be replayed once after an upstream 401.
REPLAYABLE_BODY = 1024 * 1024
# The caller gone while we write to it: aiohttp raises ClientConnectionResetError (a ConnectionResetError).
_CALLER_WRITE_ERRORS = (aiohttp.ClientConnectionError, ConnectionResetError)


@dataclass(slots=True)
class Exchange:
    """What the access log and the metrics want to know about one proxied request."""

    started: float = field(default_factory=time.monotonic)
    route: str = "other"
    upstream_status: int | None = None
    ttfb: float | None = None  # seconds from sending upstream to its response head
    bytes_in: int = 0
    bytes_out: int = 0
    # The upstream's ids for this exchange (what Microsoft support asks for): apim-request-id, x-request-id, region
    upstream_ids: tuple[str | None, str | None, str | None] = (None, None, None)
    # The status of a response whose every byte was handed to the caller's connection: what is recorded even
    # if the caller hangs up before the last chunk terminator (the openai SDK does, right after [DONE]).
    delivered: int | None = None


EXCHANGE = web.RequestKey("exchange", Exchange)


class Send(Protocol):
    """Pool.request's shape: what the proxy calls for each upstream request."""

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


def filter_headers(
    headers: Iterable[tuple[str, str]], drop: frozenset[str], connection: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Header pairs minus `drop` and whatever the Connection header values name as hop-by-hop."""
    listed = {token.strip().lower() for value in connection for token in value.split(",")}
    if listed:
        drop = drop | listed
    return [(name, value) for name, value in headers if name.lower() not in drop]


def _connection_values(headers: Iterable[tuple[str, str]]) -> list[str]:
    return [value for name, value in headers if name.lower() == "connection"]


class ReplayBudget:
    """The bytes all requests together may hold in memory for a 401 replay. Past it a request streams without
    replay, so callers waiting for a token (or a slow upstream) cannot pile up memory."""

    __slots__ = ("_left",)

    def __init__(self, total: int) -> None:
        self._left = total

    def take(self, size: int) -> bool:
        if size > self._left:
            return False
        self._left -= size
        return True

    def give(self, size: int) -> None:
        self._left += size


class Proxy:
    def __init__(
        self,
        *,
        authorizer: Authorizer,
        metrics: Metrics,
        extra_headers: Mapping[str, str] | None = None,
        audience: str = "",
        replay_budget: int = 64 * REPLAYABLE_BODY,
    ) -> None:
        self._authorizer = authorizer
        self._replay = ReplayBudget(replay_budget)
        self._pool: Pool | None = None
        self._send_upstream: Send | None = None
        self._metrics = metrics
        # static headers replace any the caller sent under the same name
        self._extra_headers = list((extra_headers or {}).items())
        self._drop_from_caller = _DROP_FROM_CALLER | {name.lower() for name in (extra_headers or {})}
        self._audience = audience

    def attach(self, pool: Pool, wrap: Callable[[Send], Send] | None = None) -> None:
        """The app's one upstream connection pool, created when the app starts (it needs a loop). `wrap`: the
        tracing around each upstream request (sidecar/telemetry.py), bound here once: with tracing off the
        request path is exactly the untraced one."""
        self._pool = pool
        self._send_upstream = pool.request if wrap is None else wrap(pool.request)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # One flat coroutine for the whole exchange: each level of awaits is paid again on every resume.
        exchange = Exchange(route=route_family(request.path))
        request[EXCHANGE] = exchange
        caller = request.headers
        connection = caller.getall("Connection", ()) if "Connection" in caller else ()
        headers = filter_headers(caller.items(), self._drop_from_caller, connection)
        headers += self._extra_headers
        reserved = 0
        try:
            # Small bodies are read so a 401 can be replayed, while the replay budget lasts; large, chunked or
            # over-budget ones stream (None) and a 401 reaches the caller as it is.
            if not request.body_exists:
                body: bytes | None = b""
            elif (
                (length := request.content_length) is not None
                and length <= REPLAYABLE_BODY
                and self._replay.take(length)
            ):
                reserved = length
                body = await request.read()
            else:
                body = None
            token = await self._authorizer.token_for(caller)
            upstream = await self._send(request, headers, token, body, exchange)
            if upstream.status == 401:
                rejection = await _read_whole(upstream)
                # The authorizer decides whether a new token is worth an identity-provider call (None: it is not)
                newer = None if body is None else await self._authorizer.token_after_rejection(caller, token)
                if newer is not None:
                    log.info("upstream answered 401; replaying once with a new token")
                    token = newer
                    upstream = await self._send(request, headers, token, body, exchange)
                    rejection = await _read_whole(upstream) if upstream.status == 401 else None
                if rejection is not None:
                    exchange.upstream_status = 401
                    return self._rejection_response(upstream, rejection, token)
            exchange.upstream_status = upstream.status
            return await self._relay(request, upstream, exchange)
        except IdentityError as exc:
            return identity_error_response(exc)
        except UpstreamError as exc:
            return _failure_response(exc)
        finally:
            self._replay.give(reserved)

    async def _send(
        self,
        request: web.BaseRequest,
        headers: list[tuple[str, str]],
        token: str,
        body: bytes | None,
        exchange: Exchange,
    ) -> Response:
        sent = time.monotonic()
        assert self._send_upstream is not None, "Proxy.attach() is called when the app starts"
        # raw_path keeps the caller's encoding and query byte-for-byte (api-version, repeated keys)
        upstream = await self._send_upstream(
            request.method,
            request.raw_path,
            [*headers, ("Authorization", "Bearer " + token)],
            body=body,
            stream=request.content if body is None else None,
            stream_length=request.content_length if body is None else None,
        )
        exchange.bytes_in = len(body) if body is not None else (request.content_length or 0)
        exchange.ttfb = time.monotonic() - sent
        self._metrics.observe_ttfb(exchange.route, exchange.ttfb)
        exchange.upstream_ids = _upstream_ids(upstream.headers)
        return upstream

    def _rejection_response(self, upstream: Response, body: bytes, token: str) -> web.Response:
        """The upstream's 401 as it was; an empty one (App Service authentication) explained instead."""
        if body.strip():
            response = web.Response(status=401, body=body)
            response.headers.extend(
                filter_headers(
                    upstream.headers, _DROP_FROM_UPSTREAM | {"content-length"}, _connection_values(upstream.headers)
                )
            )
            return response
        audience = unverified_claims(token).get("aud") or self._audience or "unknown"
        return error_response(
            401,
            "UpstreamUnauthorized",
            f"the upstream rejected the sidecar's token (issued for audience {audience!r}). Check that auth.scope "
            "names the upstream's Application ID URI and that the identity has the app role or scope it needs.",
            retryable=False,
        )

    async def _relay(self, request: web.BaseRequest, upstream: Response, exchange: Exchange) -> web.StreamResponse:
        received = upstream.headers
        headers = CIMultiDict(filter_headers(received, _DROP_FROM_UPSTREAM, _connection_values(received)))
        # Body bytes already here leave in the same write as the head (one syscall, one wake-up for the
        # caller); with none yet (a model still thinking) the head goes out at once: the caller sees the start.
        metrics = self._metrics
        metrics.stream_started()
        response: web.StreamResponse | None = None
        try:
            data = upstream.ready()
            kind = _CoalescingResponse if data or upstream.ended else web.StreamResponse
            response = kind(status=upstream.status, reason=upstream.reason, headers=headers)
            await response.prepare(request)
            while True:
                exchange.bytes_out += len(data)
                if upstream.ended:
                    if not data:
                        exchange.delivered = upstream.status  # only the end of the body is left to send
                    await response.write_eof(data)  # the last bytes and the end of the body in one write
                    exchange.delivered = upstream.status
                    break
                if data:
                    await response.write(data)  # each SSE event goes out as soon as it arrives
                data = await upstream.next()
        except asyncio.CancelledError:
            _delivered_if_ended(upstream, exchange)  # the caller left: had it got everything?
            raise
        except (UpstreamError, *_CALLER_WRITE_ERRORS, TimeoutError) as exc:
            if isinstance(exc, ConnectionResetError) and _caller_gone(request):
                _delivered_if_ended(upstream, exchange)
                raise asyncio.CancelledError from None  # the caller left; nothing to tell it
            if response is None and isinstance(exc, UpstreamError):
                return _failure_response(exc)  # broken before anything was sent: the caller gets a 502
            # Headers are out: the only honest signal left is to cut the connection without a clean end.
            log.warning("upstream failed mid-response (%s); aborting the caller's connection", type(exc).__name__)
            _abort(request)
        finally:
            upstream.close()  # an unfinished upstream exchange is closed: a caller that left ends it too
            metrics.stream_ended(exchange.route, exchange.bytes_out, time.monotonic() - exchange.started)
        assert response is not None
        return response


class _CoalescingResponse(web.StreamResponse):
    """A StreamResponse whose head waits for the first body write and leaves with it (as web.Response's does).

    aiohttp's StreamResponse writes its head on prepare(): one more syscall per request, and for the caller
    one more wake-up before the first byte of the body. The class attribute is aiohttp's own switch; were
    it renamed, this would quietly write the head on prepare() again.
    """

    _send_headers_immediately = False


def _failure_response(exc: UpstreamError) -> web.Response:
    """The JSON answer for an upstream that could not be reached or answered nothing usable."""
    if isinstance(exc, Unsendable):
        if isinstance(exc, OffOrigin):  # the gate should have refused it: worth a line for whoever maintains it
            log.warning("refused to send a request off the upstream's origin")
        return error_response(400, "InvalidRequest", str(exc), retryable=False)
    if isinstance(exc, ConnectError):
        return error_response(502, "UpstreamUnreachable", f"cannot connect to the upstream: {exc.os_error}")
    if isinstance(exc, ConnectTimeout):
        return error_response(502, "UpstreamUnreachable", "connecting to the upstream timed out")
    if isinstance(exc, ReadTimeout):
        return error_response(504, "UpstreamTimeout", "the upstream sent no response within upstream.read_timeout")
    return error_response(502, "UpstreamError", f"the upstream connection failed: {exc}")


async def _read_whole(upstream: Response) -> bytes:
    """A (small) rejection's body, read so the connection can be pooled again; b"" if it broke off."""
    try:
        return await upstream.read()
    except UpstreamError:
        return b""
    finally:
        upstream.close()


def _upstream_ids(headers: list[tuple[str, str]]) -> tuple[str | None, str | None, str | None]:
    apim = request_id = region = None
    for name, value in headers:
        lower = name.lower()
        if lower == "apim-request-id":
            apim = value
        elif lower == "x-request-id":
            request_id = value
        elif lower == "x-ms-region":
            region = value
    return apim, request_id, region


def _delivered_if_ended(upstream: Response, exchange: Exchange) -> None:
    """A caller that leaves once every body byte went out got the whole answer, though the upstream's end of
    body (the final chunk terminator) may have arrived only as it left."""
    if exchange.delivered is None:
        try:
            if not upstream.ready() and upstream.ended:
                exchange.delivered = upstream.status
        except UpstreamError:
            pass


def _caller_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
