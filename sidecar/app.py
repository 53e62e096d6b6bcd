"""build_app(settings) -> the aiohttp Application: routes, guards, and the lifecycle of its parts.

A request's path: `dispatch` (the gate: target and inbound key; routes, access log, metrics) -> Proxy.handle
(sidecar/proxy.py) -> Authorizer.token_for (sidecar/tokens/) -> upstream (sidecar/upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from sidecar import doctor, health
from sidecar.accesslog import AccessLog
from sidecar.backends import Backend, Backends
from sidecar.config import Settings, audience_of, read_secret_file
from sidecar.config.routes import RouteConfig
from sidecar.errors import error_response
from sidecar.exchange import EXCHANGE, ReplayBudget
from sidecar.gate import InboundKeys, target_problem
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.routes import route_family
from sidecar.tls import client_ssl_context
from sidecar.tokens import build_authorizer
from sidecar.tokens.base import Authorizer, IdentityError, TokenObserver
from sidecar.tokens.manager import RetryPolicy
from sidecar.upstream import Pool
from sidecar.websocket import UpstreamSockets, WebSocketRelay, is_websocket, key_headers

if TYPE_CHECKING:
    from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar")
access_log = logging.getLogger("sidecar.access")

Handler = health.Handler
# Builds the authorizer around the observer the app gives it (its metrics).
AuthorizerFactory = Callable[[TokenObserver], Authorizer]

SETTINGS = web.AppKey("settings", Settings)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)
DISPATCH: web.AppKey[Handler] = web.AppKey("dispatch")
ADMIN: web.AppKey[Handler] = web.AppKey("admin")  # the admin listener's handler (health, readiness, metrics)
WEBSOCKETS = web.AppKey("websockets", list)  # one WebSocketRelay per route, closed at the end of a drain


def build_dispatch(
    settings: Settings,
    metrics: Metrics,
    state: dict[str, object],
    routes: Sequence[tuple[Proxy, WebSocketRelay]],
    authorizers: Sequence[Authorizer],
    keys: InboundKeys,
) -> Handler:
    """Every request's one entry point: the gate (request target, inbound key; sidecar/gate.py), the routes,
    the access log and the metrics, in one function.

    Why not aiohttp's router and a middleware: with four routes, profiling showed the router (a regex and
    an unquoted match dict for /openai/{tail}), Application._handle and the middleware wrapper at about 10 %
    of the sidecar's CPU per proxied request. server.start() hands this function to aiohttp's server
    directly; the Application also routes every path here, so both ways behave the same.
    """
    access = AccessLog(access_log) if settings.logging.access_log else None

    # /metrics moves to the admin listener when there is one: scrapers, not applications, read it
    own_routes = health.own_routes(state, authorizers, metrics.render if settings.admin.port is None else None)

    def route_of(target: str) -> tuple[Proxy, WebSocketRelay] | None:
        """The route whose prefix the raw target starts with, longest first (`routes` is sorted so). Compared on
        the raw bytes: `/%6Fpenai/` is not `/openai/`, so what the upstream sees is exactly what was checked."""
        for route in routes:
            if target.startswith(route[0].prefix):
                return route
        return None

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        state["in_flight"] = int(state["in_flight"]) + 1  # type: ignore[call-overload]
        response: web.StreamResponse | None = None
        try:
            target = request.raw_path  # the request target as sent: never a decoded or normalised form
            problem = target_problem(target)
            if problem is not None:
                response = error_response(400, *problem, retryable=False)
            elif (route := route_of(target)) is not None:
                upgrade = is_websocket(request)  # the Realtime API: sidecar/websocket.py
                if keys and not keys.admit(key_headers(request) if upgrade else request.headers):
                    response = error_response(
                        401,
                        "Unauthorized",
                        "missing or wrong api-key for this sidecar (inbound.api_keys / inbound.api_keys_file)",
                        retryable=False,
                    )
                else:
                    if "Expect" in request.headers:
                        await expect_continue(request)
                    proxy, relay = route
                    response = await (relay.handle(request) if upgrade else proxy.handle(request))
            else:
                handler = own_routes.get(target.partition("?")[0]) if request.method in ("GET", "HEAD") else None
                response = await (handler or not_found)(request)
            if state["draining"]:
                response.force_close()  # push keep-alive callers to another replica while we drain
            return response
        except web.HTTPException as exc:
            response = error_response(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
            return response
        finally:
            state["in_flight"] = int(state["in_flight"]) - 1  # type: ignore[call-overload]
            _account(request, response, started, metrics, access)

    return dispatch


async def expect_continue(request: web.BaseRequest) -> None:
    """What aiohttp's router does for `Expect: 100-continue` before the body is read (and 417 otherwise)."""
    expect = request.headers.get("Expect", "")
    if request.version != aiohttp.HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    writer = request.writer
    await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.output_size = 0  # the interim answer is not part of the response's size


async def _expect_in_dispatch(request: web.Request) -> None:
    """The router's own Expect handling is off: dispatch does it, whichever way the request came in."""


def _account(
    request: web.BaseRequest,
    response: web.StreamResponse | None,
    started: float,
    metrics: Metrics,
    access: AccessLog | None,
) -> None:
    exchange = request.get(EXCHANGE)
    route = exchange.route if exchange else route_family(request.path)
    if response is not None:
        status = response.status
    elif exchange is not None and exchange.delivered is not None:
        status = exchange.delivered  # the caller left after the whole answer: not its error, nor ours
    else:
        status = 499  # the caller went away before the answer ended
    metrics.count_request(request.method, status, route, exchange.bytes_in if exchange is not None else 0)
    if access is not None and route != "sidecar":
        access.log(request, route, status, started, exchange)


def _static_headers(route: RouteConfig) -> dict[str, str]:
    headers = {name: value.get_secret_value() for name, value in route.headers.items()}
    for name, path in route.headers_files.items():
        headers[name] = read_secret_file(path)
    return headers


def _authorizers(
    settings: Settings,
    routes: Sequence[RouteConfig],
    metrics: Metrics,
    observe: TokenObserver,
    make_authorizer: AuthorizerFactory | None,
    retry: RetryPolicy | None,
) -> dict[str, Authorizer]:
    """One authorizer (one token cache) per scope the routes ask for; the same flow and credentials for all.

    `observe` hears of every identity-provider call (metrics, and a span when tracing is on). A handed-in
    authorizer only counts its calls here: they are made, and traced, where it was built (a worker's parent).
    """
    authorizers: dict[str, Authorizer] = {}
    for scope in dict.fromkeys(route.scope or settings.auth.scope for route in routes):
        if scope == settings.auth.scope and make_authorizer is not None:
            authorizers[scope] = make_authorizer(metrics.observe_token)
            continue
        scoped = settings.model_copy(update={"auth": settings.auth.model_copy(update={"scope": scope})})
        authorizers[scope] = build_authorizer(scoped, observer=observe, retry=retry)
    return authorizers


def build_app(
    settings: Settings,
    *,
    make_authorizer: AuthorizerFactory | None = None,
    retry: RetryPolicy | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """Everything the app needs comes from `settings`, or is handed in (a worker process's authorizer and the
    metrics its parent reads, a test's retry policy): no module state. `make_authorizer` builds the one for
    `auth.scope`."""
    metrics = metrics or Metrics()
    state: dict[str, object] = {"draining": False, "in_flight": 0}
    app = web.Application(
        client_max_size=1024**4,  # bodies stream; this only bounds request.read() of small replayable ones
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STATE] = state
    telemetry: Telemetry | None = None
    observe: TokenObserver = metrics.observe_token
    if settings.telemetry.otlp_endpoint is not None:
        from sidecar import telemetry as tracing  # only then: with tracing off, no opentelemetry module loads

        telemetry = tracing.Telemetry(settings.telemetry)
        observe = telemetry.observer(metrics.observe_token)
    routes = settings.effective_routes()
    by_scope = _authorizers(settings, routes, metrics, observe, make_authorizer, retry)
    primary = by_scope.get(settings.auth.scope) or next(iter(by_scope.values()))
    app[AUTHORIZER] = primary
    metrics.track_expiry(primary.seconds_until_expiry)
    replay = ReplayBudget(settings.upstream.replay_buffer)  # one budget for every route
    proxies: list[Proxy] = []
    relays: list[WebSocketRelay] = []
    for route in routes:
        scope = route.scope or settings.auth.scope
        headers = _static_headers(route)
        backends = [Backend(b.name or str(i), b.url, b.priority) for i, b in enumerate(route.upstream)]
        proxies.append(
            Proxy(
                authorizer=by_scope[scope],
                metrics=metrics,
                backends=Backends(backends),
                replay=replay,
                extra_headers=headers,
                audience=audience_of(scope),
                name=route.prefix,
            )
        )
        relays.append(
            WebSocketRelay(
                authorizer=by_scope[scope], metrics=metrics, extra_headers=headers, audience=audience_of(scope)
            )
        )
    app[WEBSOCKETS] = relays
    probes = [(proxy, route.probe_path) for proxy, route in zip(proxies, routes, strict=True) if route.probe_path]
    if not settings.upstream.probe:
        probes = []

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        ssl_context = client_ssl_context(settings.tls.ca_bundle)
        upstream = settings.upstream
        sockets: list[UpstreamSockets] = []
        for proxy, relay in zip(proxies, relays, strict=True):
            for backend in proxy.backends.all:
                backend.pool = Pool(
                    backend.url,
                    ssl_context,
                    connect_timeout=upstream.connect_timeout,
                    read_timeout=upstream.read_timeout,  # idle time between bytes, never a total
                    keepalive_timeout=30.0,
                    proxy=settings.network.proxy_for(backend.url),
                )
                request = backend.pool.request
                backend.send = request if telemetry is None else telemetry.send(request, backend.url)
            # Realtime sessions go to the route's preferred backend: a session is long, failover is per request
            preferred = min(proxy.backends.all, key=lambda backend: backend.priority)
            sockets.append(
                UpstreamSockets(
                    preferred.url,
                    ssl_context,
                    connect_timeout=upstream.connect_timeout,
                    read_timeout=upstream.read_timeout,
                    proxy=settings.network.proxy_for(preferred.url),
                )
            )
            relay.attach(sockets[-1])
        if telemetry is not None:
            telemetry.start()  # before the first token fetch, which it traces
        for each in by_scope.values():
            await each.start()
        checks = [asyncio.create_task(_probe_once_ready(proxy, path)) for proxy, path in probes]
        checks.append(asyncio.create_task(keys.watch()))  # inbound.api_keys_file, read again when it changes
        try:
            yield
        finally:
            for check in checks:
                check.cancel()
            for each in by_scope.values():
                await each.aclose()
            for proxy in proxies:
                for backend in proxy.backends.all:
                    if backend.pool is not None:
                        await backend.pool.close()
            for each_sockets in sockets:
                await each_sockets.close()
            if telemetry is not None:
                await telemetry.aclose()  # the last spans leave (bounded), in-flight ones ended by now

    authorizers = list(by_scope.values())
    keys = InboundKeys(
        (key.get_secret_value() for key in settings.inbound.api_keys),
        bearer_is_key=not authorizers[0].takes_caller_bearer,  # one flow for every route
        key_file=settings.inbound.api_keys_file,
    )
    table = sorted(zip(proxies, relays, strict=True), key=lambda pair: -len(pair[0].prefix))
    dispatch = build_dispatch(settings, metrics, state, table, authorizers, keys)
    if telemetry is not None:
        dispatch = telemetry.dispatch(dispatch)
    app[DISPATCH] = dispatch
    app[ADMIN] = health.admin_handler(health.own_routes(state, authorizers, metrics.render))
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=_expect_in_dispatch)
    app.cleanup_ctx.append(lifecycle)
    return app


async def _probe_once_ready(proxy: Proxy, path: str) -> None:
    """At start-up, with the route's first token (the fetch every request waits for, not another one): one
    request to its first backend, one log line on what it means (sidecar/doctor.py). Without a token (an
    identity-provider failure is logged where it happens; per-caller flows have none to try) it says nothing."""
    try:
        token = await proxy.authorizer.token_for({})
    except IdentityError:
        return
    backend = proxy.backends.all[0]
    assert backend.pool is not None
    diagnosis = await doctor.probe(backend.pool, backend.url, path, token, proxy.audience)
    (log.info if diagnosis.ok else log.warning)("start-up check: %s", diagnosis.line)


async def not_found(request: web.BaseRequest) -> web.Response:
    return error_response(
        404,
        "NotFound",
        "the sidecar forwards /openai/... only (and serves /healthz, /readyz, /metrics)",
        retryable=False,
    )
