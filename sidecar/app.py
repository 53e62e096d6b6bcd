"""build_app(settings) -> the aiohttp Application: routes, guards, and the lifecycle of its parts.

A request's path: `dispatch` (the gate: target and inbound key; routes, access log, metrics) -> Proxy.handle
(sidecar/proxy.py) -> Authorizer.token_for (sidecar/tokens/) -> upstream (sidecar/upstream.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from sidecar import doctor, health
from sidecar.accesslog import AccessLog
from sidecar.config import Flow, Settings, read_secret_file
from sidecar.errors import error_response
from sidecar.gate import InboundKeys, forwarded, target_problem
from sidecar.metrics import Metrics
from sidecar.proxy import EXCHANGE, Proxy
from sidecar.routes import route_family
from sidecar.tls import client_ssl_context
from sidecar.tokens import build_authorizer
from sidecar.tokens.base import Authorizer, IdentityError
from sidecar.tokens.manager import RetryPolicy
from sidecar.upstream import Pool

if TYPE_CHECKING:
    from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar")
access_log = logging.getLogger("sidecar.access")

Handler = health.Handler

SETTINGS = web.AppKey("settings", Settings)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)
DISPATCH: web.AppKey[Handler] = web.AppKey("dispatch")
ADMIN: web.AppKey[Handler] = web.AppKey("admin")  # the admin listener's handler (health, readiness, metrics)

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
        bearer_is_key=settings.auth.flow is not Flow.ON_BEHALF_OF,
    )
    access = AccessLog(access_log) if settings.logging.access_log else None

    # /metrics moves to the admin listener when there is one: scrapers, not applications, read it
    own_routes = health.own_routes(state, authorizer, metrics, with_metrics=settings.admin.port is None)

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
    if response is not None:
        status = response.status
    elif exchange is not None and exchange.delivered is not None:
        status = exchange.delivered  # the caller left after the whole answer: not its error, nor ours
    else:
        status = 499  # the caller went away before the answer ended
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
    authorizer: Authorizer | None = None,
    retry: RetryPolicy | None = None,
) -> web.Application:
    """Everything the app needs comes from `settings` (or is handed in for tests): no module state."""
    metrics = Metrics()
    state: dict[str, object] = {"draining": False, "in_flight": 0}
    app = web.Application(
        client_max_size=1024**4,  # bodies stream; this only bounds request.read() of small replayable ones
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STATE] = state
    telemetry: Telemetry | None = None
    if settings.telemetry.otlp_endpoint is not None:
        from sidecar import telemetry as tracing  # only then: with tracing off, no opentelemetry module loads

        telemetry = tracing.Telemetry(settings.telemetry, settings.upstream.url)
    if authorizer is None:
        observer = metrics.observe_token if telemetry is None else telemetry.observer(metrics.observe_token)
        authorizer = build_authorizer(settings, observer=observer, retry=retry)
    app[AUTHORIZER] = authorizer
    metrics.track_expiry(authorizer.seconds_until_expiry)
    mirror = getattr(authorizer, "mirror_metrics", None)
    if mirror is not None:  # a worker process: the token counters are the parent's
        mirror(metrics)
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
        if telemetry is not None:
            telemetry.start()  # before the first token fetch, which it traces
        proxy.attach(pool, None if telemetry is None else telemetry.send)
        await authorizer.start()
        probe = asyncio.create_task(_probe_once_ready(settings, authorizer, pool)) if settings.upstream.probe else None
        try:
            yield
        finally:
            if probe is not None:
                probe.cancel()
            await authorizer.aclose()
            await pool.close()
            if telemetry is not None:
                await telemetry.aclose()  # the last spans leave (bounded), in-flight ones ended by now

    dispatch = build_dispatch(settings, metrics, state, proxy, authorizer)
    if telemetry is not None:
        dispatch = telemetry.dispatch(dispatch)
    app[DISPATCH] = dispatch
    app[ADMIN] = health.admin_handler(health.own_routes(state, authorizer, metrics))
    app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=_expect_in_dispatch)
    app.cleanup_ctx.append(lifecycle)
    return app


async def _probe_once_ready(settings: Settings, authorizer: Authorizer, pool: Pool) -> None:
    """At start-up, with the first token (the fetch every request waits for, not another one): one request to
    the upstream, one log line on what it means (sidecar/doctor.py). Without a token (an identity-provider
    failure is logged where it happens; per-caller flows have none to try) it says nothing."""
    try:
        token = await authorizer.token_for({})
    except IdentityError:
        return
    diagnosis = await doctor.probe(pool, settings.upstream.url, token, settings.auth.audience)
    (log.info if diagnosis.ok else log.warning)("start-up check: %s", diagnosis.line)


async def not_found(request: web.BaseRequest) -> web.Response:
    return error_response(
        404,
        "NotFound",
        "the sidecar forwards /openai/... only (and serves /healthz, /readyz, /metrics)",
        retryable=False,
    )
