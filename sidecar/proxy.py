"""The forwarding handler: headers in, a bearer token on, the body streamed both ways, errors in the
Azure OpenAI shape.

One Proxy per app; it sends through the app's upstream transport (sidecar/upstream.py, aiohttp's client).
It asks the Authorizer for a token and knows nothing of flows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.backends import (
    DEFAULT_THROTTLE_COOLDOWN,
    DEFAULT_UNREACHABLE_COOLDOWN,
    THROTTLED,
    AllCooling,
    Backend,
    Backends,
    retry_after,
)
from sidecar.claims import unverified_claims
from sidecar.errors import error_response, identity_error_response, upstream_error_response
from sidecar.exchange import EXCHANGE, REPLAYABLE_BODY, Exchange, ReplayBudget, upstream_ids
from sidecar.metrics import Metrics
from sidecar.routes import route_family
from sidecar.tokens.base import Authorizer, IdentityError
from sidecar.upstream import (
    ConnectError,
    ConnectTimeout,
    Response,
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
# Seconds a small (in-memory, <= 1 MiB) request body has to arrive; larger ones stream at the caller's pace.
BODY_READ_TIMEOUT = 60.0
# The caller gone while we write to it: aiohttp raises ClientConnectionResetError (a ConnectionResetError).
_CALLER_WRITE_ERRORS = (aiohttp.ClientConnectionError, ConnectionResetError)


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


class Proxy:
    """One route's forwarding: its authorizer (its scope), its backends, its static headers."""

    def __init__(
        self,
        *,
        authorizer: Authorizer,
        metrics: Metrics,
        backends: Backends,
        replay: ReplayBudget,
        extra_headers: Mapping[str, str] | None = None,
        audience: str = "",
        name: str = "/openai/",
    ) -> None:
        self.authorizer = authorizer
        self._replay = replay
        self.backends = backends
        self.prefix = self.name = name
        self.audience = audience
        self._metrics = metrics
        # static headers replace any the caller sent under the same name
        self._extra_headers = list((extra_headers or {}).items())
        self._drop_from_caller = _DROP_FROM_CALLER | {name.lower() for name in (extra_headers or {})}
        self._audience = audience

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # One flat coroutine for the whole exchange: each level of awaits is paid again on every resume.
        exchange = Exchange(route=route_family(request.path))
        request[EXCHANGE] = exchange
        caller = request.headers
        connection = caller.getall("Connection", ()) if "Connection" in caller else ()
        headers = filter_headers(caller.items(), self._drop_from_caller, connection)
        headers += self._extra_headers
        reserved = 0
        body: bytes | None = b""
        try:
            # Small bodies are read so a 401 can be replayed, while the replay budget lasts; large, chunked or
            # over-budget ones stream (None) and a 401 reaches the caller as it is.
            if not request.body_exists:
                body = b""
            elif (
                (length := request.content_length) is not None
                and length <= REPLAYABLE_BODY
                and self._replay.take(length)
            ):
                reserved = length
                try:  # a caller trickling a small body must not hold its replay bytes (and a handler) forever
                    async with asyncio.timeout(BODY_READ_TIMEOUT):
                        body = await request.read()
                except TimeoutError:
                    return error_response(
                        408, "RequestTimeout", f"the request body did not arrive within {BODY_READ_TIMEOUT:.0f} s"
                    )
            else:
                body = None
            token = await self.authorizer.token_for(caller)
            upstream, backend = await self._send_with_failover(request, headers, token, body, exchange)
            if upstream.status == 401:
                rejection = await _read_whole(upstream)
                # The authorizer decides whether a new token is worth an identity-provider call (None: it is not)
                newer = None if body is None else await self.authorizer.token_after_rejection(caller, token)
                if newer is not None:
                    log.info("upstream answered 401; replaying once with a new token")
                    token = newer
                    upstream = await self._send(request, headers, token, body, exchange, backend)
                    rejection = await _read_whole(upstream) if upstream.status == 401 else None
                if rejection is not None:
                    exchange.upstream_status = 401
                    return self._rejection_response(upstream, rejection, token)
            exchange.upstream_status = upstream.status
            return await self._relay(request, upstream, exchange)
        except IdentityError as exc:
            return identity_error_response(exc)
        except UpstreamError as exc:
            return upstream_error_response(exc)
        finally:
            self._replay.give(reserved)
            if body is None:  # streamed: what was read from the caller, not its Content-Length (none if chunked)
                exchange.bytes_in = request.content.total_bytes

    async def _send_with_failover(
        self,
        request: web.BaseRequest,
        headers: list[tuple[str, str]],
        token: str,
        body: bytes | None,
        exchange: Exchange,
    ) -> tuple[Response, Backend]:
        """To the best backend; after a 429/503 or no connection, once more to the next one, when the body is in
        memory (it can be sent again) and another backend is not cooling. Nothing has reached the caller yet."""
        backends = self.backends
        backend = backends.pick()
        if backend is None:
            raise AllCooling(backends.smallest_wait())
        try:
            upstream = await self._send(request, headers, token, body, exchange, backend)
        except (ConnectError, ConnectTimeout):
            retry = backends.pick(exclude=(backend,)) if backends.failover and body is not None else None
            if retry is None:
                raise
            return await self._send(request, headers, token, body, exchange, retry), retry
        if upstream.status in THROTTLED and backends.failover and body is not None:
            retry = backends.pick(exclude=(backend,))
            if retry is not None:
                await _read_whole(upstream)
                return await self._send(request, headers, token, body, exchange, retry), retry
        return upstream, backend

    def _cool(self, backend: Backend, seconds: float) -> None:
        Backends.cool(backend, seconds)
        self._metrics.count_cooldown(self.name, backend.name)
        log.info("backend %s of %s cooling down for %.1f s", backend.name, self.name, seconds)

    async def _send(
        self,
        request: web.BaseRequest,
        headers: list[tuple[str, str]],
        token: str,
        body: bytes | None,
        exchange: Exchange,
        backend: Backend,
    ) -> Response:
        sent = time.monotonic()
        assert backend.send is not None, "the app's start-up gives every backend its pool"
        exchange.backend = backend.name
        # raw_path keeps the caller's encoding and query byte-for-byte (api-version, repeated keys)
        try:
            upstream = await backend.send(
                request.method,
                request.raw_path,
                [*headers, ("Authorization", "Bearer " + token)],
                body=body,
                stream=request.content if body is None else None,
                stream_length=request.content_length if body is None else None,
            )
        except (ConnectError, ConnectTimeout):
            if self.backends.failover:  # a backend that cannot be reached is set aside for a moment
                self._cool(backend, DEFAULT_UNREACHABLE_COOLDOWN)
            raise
        exchange.bytes_in = len(body) if body is not None else (request.content_length or 0)
        exchange.ttfb = time.monotonic() - sent
        self._metrics.observe_ttfb(exchange.route, exchange.ttfb)
        exchange.upstream_ids = upstream_ids(upstream.headers)
        self._metrics.count_backend(self.name, backend.name, upstream.status)
        if upstream.status in THROTTLED and self.backends.failover:  # for as long as it asks
            self._cool(backend, retry_after(upstream.headers) or DEFAULT_THROTTLE_COOLDOWN)
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
                return upstream_error_response(exc)  # broken before anything was sent: the caller gets a 502
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


async def _read_whole(upstream: Response) -> bytes:
    """A (small) rejection's body, read so the connection can be pooled again; b"" if it broke off."""
    try:
        return await upstream.read()
    except UpstreamError:
        return b""
    finally:
        upstream.close()


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
