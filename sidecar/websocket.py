"""WebSocket pass-through (the Realtime API): an upgrade under /openai/ becomes two WebSockets, one with the
caller (aiohttp's server) and one with the upstream (aiohttp's client), and messages are relayed both ways.

The upstream handshake is made first, so that a refusal reaches the caller as the HTTP answer it is (401, 403,
404, ...). It carries exactly one `Authorization: Bearer <token>`: the caller's `Authorization` and `api-key`
headers, an `api-key` query parameter and any `openai-insecure-api-key.*` subprotocol (how browsers, which
cannot set headers, send a key) stay here. Nothing is buffered beyond the message in hand: each message is
sent on as soon as it is complete, and a side that reads slowly stops the reading of the other (aiohttp's
writer waits for the socket to drain, its reader pauses the socket when its queue is full). Pings are
answered on each leg; a close frame, with its code and reason, is passed on to the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.claims import unverified_claims
from sidecar.errors import error_response, identity_error_response
from sidecar.errors import upstream_error_response as failure_response
from sidecar.exchange import EXCHANGE, Exchange
from sidecar.metrics import Metrics
from sidecar.proxy import HOP_BY_HOP, filter_headers
from sidecar.routes import route_family
from sidecar.tokens.base import Authorizer, IdentityError
from sidecar.upstream import (
    WS_CLOSE_TIMEOUT,
    WS_HEARTBEAT,
    WS_MAX_MESSAGE,
    HandshakeRefused,
    UpstreamError,
    UpstreamSockets,
)

log = logging.getLogger("sidecar.websocket")

# The subprotocol prefix the openai SDKs and browsers use to send an api key during the handshake.
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key"

_DROP_FROM_CALLER = HOP_BY_HOP | {
    "host",
    "authorization",
    "api-key",
    "expect",
    "content-length",
    # the handshake is made again on each leg: aiohttp writes the upstream's, the subprotocols are filtered
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "sec-websocket-accept",
}
_DROP_FROM_UPSTREAM = HOP_BY_HOP | {"content-length"}
# Close codes that must never be sent in a close frame (RFC 6455 §7.4.1), and 0: a close frame without one.
_UNSENDABLE_CODES = frozenset({0, 1005, 1006, 1015})
_DIRECTIONS = {"caller": "to_upstream", "upstream": "to_caller"}  # direction of a message by its sender
_KINDS = {WSMsgType.TEXT: "text", WSMsgType.BINARY: "binary"}


def is_websocket(request: web.BaseRequest) -> bool:
    """An upgrade to WebSocket: `Upgrade: websocket` with `Connection: upgrade` (RFC 6455 §4.1). Anything else
    is proxied as a request, and loses its Upgrade header."""
    headers = request.headers
    upgrade = headers.get("Upgrade")
    if upgrade is None or not any(token.strip().lower() == "websocket" for token in upgrade.split(",")):
        return False
    return any(
        token.strip().lower() == "upgrade" for value in headers.getall("Connection", ()) for token in value.split(",")
    )


def offered_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    values = headers.getall("Sec-WebSocket-Protocol", ())
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _carries_key(protocol: str) -> bool:
    return protocol.lower().startswith(INSECURE_KEY_PROTOCOL)


def _is_key_parameter(pair: str) -> bool:
    # decoded and case-folded: `API-Key=` and `api%2Dkey=` mean the same to the upstream
    return unquote_plus(pair.partition("=")[0]).strip().lower() == "api-key"


def without_key(raw_target: str) -> str:
    """The raw target minus its `api-key` query parameters; everything else stays byte-for-byte."""
    path, separator, query = raw_target.partition("?")
    if not separator:
        return raw_target
    pairs = query.split("&")
    kept = [pair for pair in pairs if not _is_key_parameter(pair)]
    if len(kept) == len(pairs):
        return raw_target
    return path + "?" + "&".join(kept) if kept else path


def key_headers(request: web.BaseRequest) -> Mapping[str, str]:
    """What InboundKeys reads for an upgrade: the headers, and when no `api-key` header is there, the key a
    WebSocket caller may send instead, in an `api-key` query parameter or an `openai-insecure-api-key.<key>`
    subprotocol, as if it were one."""
    headers = request.headers
    if "api-key" in headers:
        return headers
    key = None
    _, separator, query = request.raw_path.partition("?")
    if separator:
        key = next((unquote_plus(p.partition("=")[2]) for p in query.split("&") if _is_key_parameter(p)), None)
    if key is None:
        carrier = next((p for p in offered_protocols(headers) if _carries_key(p)), None)
        key = carrier[len(INSECURE_KEY_PROTOCOL) + 1 :] if carrier else None
    if key is None:
        return headers
    merged = CIMultiDict(headers)
    merged["api-key"] = key
    return merged


def _answering(request: web.BaseRequest, protocol: str | None) -> web.BaseRequest:
    """The caller's handshake as aiohttp's server is to answer it: naming `protocol` (the upstream's choice) as
    the only subprotocol. aiohttp reads only the first Sec-WebSocket-Protocol line, and when nothing in it is
    chosen it logs the caller's whole list, which may hold an `openai-insecure-api-key.<key>`."""
    headers = CIMultiDict(request.headers)
    headers.popall("Sec-WebSocket-Protocol", None)
    if protocol:
        headers["Sec-WebSocket-Protocol"] = protocol
    return request.clone(headers=headers)


@dataclass(frozen=True, slots=True)
class _End:
    """How a session ended: who ended it, and the close frame's code and reason (None: it left without one)."""

    by: str  # "caller", "upstream" or "shutdown"
    code: int | None = None
    reason: str = ""


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class WebSocketRelay:
    """One per app: takes upgrade requests (after the gate), holds the open sessions, closes them at shutdown."""

    def __init__(
        self,
        *,
        authorizer: Authorizer,
        metrics: Metrics,
        extra_headers: Mapping[str, str] | None = None,
        audience: str = "",
    ) -> None:
        self._authorizer = authorizer
        self._metrics = metrics
        self._extra_headers = list((extra_headers or {}).items())
        self._drop_from_caller = _DROP_FROM_CALLER | {name.lower() for name in (extra_headers or {})}
        self._audience = audience
        self._sockets: UpstreamSockets | None = None
        self._live: set[asyncio.Future[None]] = set()  # one per open session: resolved to close it
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self, sockets: UpstreamSockets) -> None:
        """The app's upstream WebSocket client, created when the app starts (it needs a loop)."""
        self._sockets = sockets

    @property
    def open_sessions(self) -> int:
        return len(self._live)

    async def close_all(self) -> None:
        """Close every open session with 1001 (going away) on both legs; back once they are closed, or after
        each side has had WS_CLOSE_TIMEOUT to answer."""
        for stop in self._live:
            if not stop.done():
                stop.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 2 * WS_CLOSE_TIMEOUT + 1.0)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(route=route_family(request.path))
        request[EXCHANGE] = exchange
        # aiohttp checks the headers only: a body would be read as the caller's first frames
        valid = request.method == "GET" and not request.body_exists
        if not valid or not web.WebSocketResponse().can_prepare(_answering(request, None)).ok:
            return error_response(
                400,
                "InvalidWebSocketHandshake",
                "an Upgrade: websocket request is a GET without a body, with Connection: Upgrade, "
                "Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key",
                retryable=False,
            )
        caller = request.headers
        protocols = [p for p in offered_protocols(caller) if not _carries_key(p)]
        connection = caller.getall("Connection", ())
        headers = filter_headers(caller.items(), self._drop_from_caller, connection) + self._extra_headers
        target = without_key(request.raw_path)
        token = ""
        try:
            token = await self._authorizer.token_for(caller)
            sent = time.monotonic()
            upstream, token = await self._open(target, headers, protocols, caller, token)
            self._metrics.observe_ttfb(exchange.route, time.monotonic() - sent)
        except IdentityError as exc:
            return identity_error_response(exc)
        except HandshakeRefused as refused:
            exchange.upstream_status = refused.status
            return self._refusal_response(refused, token)
        except UpstreamError as exc:
            return failure_response(exc)
        exchange.upstream_status = 101
        socket = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),  # what the upstream chose, or none
            autoclose=False,
            autoping=True,
            heartbeat=WS_HEARTBEAT,
            compress=False,
            max_msg_size=WS_MAX_MESSAGE,
            timeout=WS_CLOSE_TIMEOUT,
            decode_text=False,
        )
        try:
            await socket.prepare(_answering(request, upstream.protocol))
        except BaseException:
            await upstream.close(code=WSCloseCode.GOING_AWAY, message=b"the caller went away")
            raise
        await self._session(socket, upstream, exchange)
        return socket

    async def _open(
        self,
        target: str,
        headers: list[tuple[str, str]],
        protocols: list[str],
        caller: Mapping[str, str],
        token: str,
    ) -> tuple[aiohttp.ClientWebSocketResponse, str]:
        """The upstream WebSocket, and the token it took: after a 401, once more with a newer token (if the
        authorizer has one: the same rule as for requests)."""
        assert self._sockets is not None, "WebSocketRelay.attach() is called when the app starts"
        try:
            return await self._sockets.connect(
                target, [*headers, ("Authorization", "Bearer " + token)], protocols
            ), token
        except HandshakeRefused as refused:
            if refused.status != 401:
                raise
            newer = await self._authorizer.token_after_rejection(caller, token)
            if newer is None:
                raise
        log.info("upstream refused the WebSocket upgrade with 401; retrying once with a new token")
        return await self._sockets.connect(target, [*headers, ("Authorization", "Bearer " + newer)], protocols), newer

    def _refusal_response(self, refused: HandshakeRefused, token: str) -> web.Response:
        """The upstream's answer as it was when it explains itself (or redirects); an empty one explained."""
        status = refused.status
        if status >= 300 and (refused.body.strip() or status < 400):
            response = web.Response(status=status, reason=refused.reason or None, body=refused.body or None)
            response.headers.extend(filter_headers(refused.headers, _DROP_FROM_UPSTREAM))
            return response
        if status < 300:
            return error_response(
                502,
                "WebSocketsNotSupported",
                f"the upstream answered the WebSocket upgrade with HTTP {status} instead of 101: it does not carry "
                "WebSockets (Azure App Service and API Management do; Azure Functions do not)",
                retryable=False,
            )
        if status == 401:
            audience = unverified_claims(token).get("aud") or self._audience or "unknown"
            return error_response(
                401,
                "UpstreamUnauthorized",
                f"the upstream rejected the sidecar's token (issued for audience {audience!r}). Check that "
                "auth.scope names the upstream's Application ID URI and that the identity has the app role or "
                "scope it needs.",
                retryable=False,
            )
        return error_response(
            status,
            "UpstreamRefused",
            f"the upstream refused the WebSocket upgrade with HTTP {status}",
            retryable=status >= 500 or status in (408, 429),
        )

    async def _session(
        self, caller: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, exchange: Exchange
    ) -> None:
        """Relay until one side closes or leaves (or the sidecar shuts down), then close both."""
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._live.add(stop)
        self._idle.clear()
        self._metrics.websocket_opened()
        ended_by = "error"
        pumps = (
            asyncio.create_task(self._pump(caller, upstream, "caller", exchange)),
            asyncio.create_task(self._pump(upstream, caller, "upstream", exchange)),
        )
        try:
            try:
                done, _ = await asyncio.wait((*pumps, stop), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the caller's connection is lost: end the upstream's at once
                ended_by = "caller"
                await _stopped(pumps)
                await _close_both(caller, upstream, WSCloseCode.GOING_AWAY, "the caller went away")
                raise
            end = _End("shutdown", WSCloseCode.GOING_AWAY, "the sidecar is shutting down")
            for pump in pumps:
                if pump in done:
                    try:
                        end = pump.result()
                    except Exception:  # a bug of ours: both sides still get a close frame
                        log.exception("websocket relay failed")
                        end = _End("error", WSCloseCode.INTERNAL_ERROR, "the sidecar failed")
                    break
            await _stopped(pumps)
            ended_by = end.by
            if end.code is not None:
                # the close frame goes on to the other side; its sender gets the same code as the answer
                code = WSCloseCode.OK if end.code in _UNSENDABLE_CODES else end.code
                await _close_both(caller, upstream, code, end.reason)
            elif end.by == "caller":
                await _close_both(caller, upstream, WSCloseCode.GOING_AWAY, "the caller went away")
            else:
                await _close_both(caller, upstream, WSCloseCode.BAD_GATEWAY, "the upstream connection broke")
        finally:
            for pump in pumps:
                pump.cancel()
            self._live.discard(stop)
            if not self._live:
                self._idle.set()
            self._metrics.websocket_closed(ended_by)
            log.debug("websocket session ended by %s", ended_by)

    async def _pump(self, source: _Socket, sink: _Socket, sender: str, exchange: Exchange) -> _End:
        """Messages from `source` to `sink`, each as soon as it is whole, until `source` closes or leaves."""
        count = self._metrics.count_frame
        direction = _DIRECTIONS[sender]
        receiver = "upstream" if sender == "caller" else "caller"
        while True:
            message = await source.receive()
            kind = message.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                data: bytes = message.data
                try:
                    await sink.send_frame(data, kind)  # waits while the sink's socket is full
                except (aiohttp.ClientConnectionError, ConnectionResetError):
                    return _End(receiver)
                count(direction, _KINDS[kind], len(data))
                if sender == "caller":
                    exchange.bytes_in += len(data)
                else:
                    exchange.bytes_out += len(data)
            elif kind is WSMsgType.CLOSE:
                return _End(sender, message.data, message.extra or "")
            else:  # CLOSING, CLOSED, ERROR: the connection ended without a close frame, or broke the protocol
                return _End(sender)


async def _stopped(pumps: Iterable[asyncio.Task[Any]]) -> None:
    """Both pumps stopped (and out of their receive(): aiohttp's close() must then read the answer itself)."""
    tasks = list(pumps)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)


async def _close_both(
    caller: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, code: int, reason: str
) -> None:
    """The upstream's leg first: closing the caller's socket makes aiohttp cancel this handler (the caller's
    connection is gone), which would cut the upstream's close handshake short."""
    message = reason.encode()[:123].decode(errors="ignore").encode()  # a close reason fits in 123 bytes
    with contextlib.suppress(Exception):
        await upstream.close(code=code, message=message)
    with contextlib.suppress(Exception):
        await caller.close(code=code, message=message)
