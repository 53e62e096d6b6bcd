"""build_app(settings) -> the aiohttp Application: routes, guards, and the lifecycle of its parts.

A request's path: `dispatch` (the gate: target and inbound key; routes, access log, metrics) -> Proxy.handle
(sidecar/proxy.py) -> Authorizer.token_for (sidecar/tokens/) -> upstream (sidecar/upstream.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from sidecar.accesslog import AccessLog
from sidecar.config import Settings, read_secret_file
from sidecar.errors import error_response
from sidecar.gate import InboundKeys, forwarded, target_problem
from sidecar.metrics import Metrics
from sidecar.proxy import EXCHANGE, Proxy
from sidecar.routes import route_family
from sidecar.tls import client_ssl_context
from sidecar.tokens import build_authorizer
from sidecar.tokens.base import Authorizer, TokenObserver
from sidecar.tokens.manager import RetryPolicy
from sidecar.upstream import Pool

log = logging.getLogger("sidecar")
access_log = logging.getLogger("sidecar.access")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Builds the authorizer around the observer the app gives it (its metrics).
AuthorizerFactory = Callable[[TokenObserver], Authorizer]

SETTINGS = web.AppKey("settings", Settings)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)
DISPATCH: web.AppKey[Handler] = web.AppKey("dispatch")

# Raw-path prefixes the sidecar forwards; everything else is its own route or 404.
FORWARDED_PREFIXES = ("/openai/",)


def build_dispatch(
    settings: Settings, metrics: Metrics, state: dict[str, object], proxy: Proxy, authorizer: Authorizer
) -> Handler:
    """Every request's one entry point: the gate (request target, inbound key; sidecar/gate.py), the routes,
    the access log and the metrics, in one function.

    Why not aiohttp's router and a middleware: with four routes, profiling showed the router (a regex and
    an unquoted match dict for /openai/{tail}), Application._handle and the middleware wrapper at about 10 %
    of the sidecar's CPU per proxied request. server.start() hands this function to aiohttp's server
    directly; the Application also routes every path here, so both ways behave the same.
    """
    keys = InboundKeys(
        (key.get_secret_value() for key in settings.inbound.api_keys),
        bearer_is_key=not authorizer.takes_caller_bearer,
    )
    access = AccessLog(access_log) if settings.logging.access_log else None

    async def healthz(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        if state["draining"]:
            return web.json_response({"status": "draining"}, status=503)
        if authorizer.is_ready():
            return web.json_response({"status": "ready", "flow": authorizer.flow})
        error = authorizer.last_error
        detail = error.one_line() if error is not None else "waiting for the first token"
        return web.json_response({"status": "not ready", "flow": authorizer.flow, "reason": detail}, status=503)

    async def metrics_endpoint(request: web.BaseRequest) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    own_routes: dict[str, Handler] = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_endpoint}

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        state["in_flight"] = int(state["in_flight"]) + 1  # type: ignore[call-overload]
        response: web.StreamResponse | None = None
        try:
            target = request.raw_path  # the request target as sent: never a decoded or normalised form
            problem = target_problem(target)
            if problem is not None:
                response = error_response(400, *problem, retryable=False)
            elif forwarded(target, FORWARDED_PREFIXES):
                if keys and not keys.admit(request.headers):
                    response = error_response(
                        401,
                        "Unauthorized",
                        "missing or wrong api-key for this sidecar (inbound.api_keys)",
                        retryable=False,
                    )
                else:
                    if "Expect" in request.headers:
                        await expect_continue(request)
                    response = await proxy.handle(request)
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
    status = response.status if response is not None else 499  # 499: the caller went away
    metrics.count_request(request.method, status, route, exchange.bytes_in if exchange is not None else 0)
    if access is not None and route != "sidecar":
        access.log(request, route, status, started, exchange)


def _static_upstream_headers(settings: Settings) -> dict[str, str]:
    headers = {name: value.get_secret_value() for name, value in settings.upstream.headers.items()}
    for name, path in settings.upstream.headers_files.items():
        headers[name] = read_secret_file(path)
    return headers


def build_app(
    settings: Settings,
    *,
    make_authorizer: AuthorizerFactory | None = None,
    retry: RetryPolicy | None = None,
) -> web.Application:
    """Everything the app needs comes from `settings`, or is handed in (the authorizer of a worker process, a
    test's retry policy): no module state."""
    metrics = Metrics()
    state: dict[str, object] = {"draining": False, "in_flight": 0}
    app = web.Application(
        client_max_size=1024**4,  # bodies stream; this only bounds request.read() of small replayable ones
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STATE] = state
    if make_authorizer is None:
        authorizer = build_authorizer(settings, observer=metrics.observe_token, retry=retry)
    else:
        authorizer = make_authorizer(metrics.observe_token)
    app[AUTHORIZER] = authorizer
    metrics.track_expiry(authorizer.seconds_until_expiry)
    proxy = Proxy(
        authorizer=authorizer,
        metrics=metrics,
        extra_headers=_static_upstream_headers(settings),
        audience=settings.auth.audience,
        replay_budget=settings.upstream.replay_buffer,
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        pool = Pool(
            settings.upstream.url,
            client_ssl_context(settings.tls.ca_bundle),
            connect_timeout=settings.upstream.connect_timeout,
            read_timeout=settings.upstream.read_timeout,  # idle time between bytes, never a total
            keepalive_timeout=30.0,
        )
        proxy.attach(pool)
        await authorizer.start()
        try:
            yield
        finally:
            await authorizer.aclose()
            await pool.close()

    dispatch = build_dispatch(settings, metrics, state, proxy, authorizer)
    app[DISPATCH] = dispatch
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=_expect_in_dispatch)
    app.cleanup_ctx.append(lifecycle)
    return app


async def not_found(request: web.BaseRequest) -> web.Response:
    return error_response(
        404,
        "NotFound",
        "the sidecar forwards /openai/... only (and serves /healthz, /readyz, /metrics)",
        retryable=False,
    )
