"""build_app(settings) -> the aiohttp Application: routes, guards, and the lifecycle of its parts.

A request's path: `guard` middleware (path traversal, inbound key, access log, metrics) -> Proxy.handle
(sidecar/proxy.py) -> Authorizer.token_for (sidecar/tokens/) -> upstream.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from sidecar.config import Flow, Settings, read_secret_file
from sidecar.errors import error_response
from sidecar.metrics import Metrics
from sidecar.proxy import EXCHANGE, Proxy
from sidecar.routes import route_family
from sidecar.tokens import build_authorizer
from sidecar.tokens.base import Authorizer
from sidecar.tokens.manager import RetryPolicy
from sidecar.tokens.tls import client_ssl_context

log = logging.getLogger("sidecar")
access_log = logging.getLogger("sidecar.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", Settings)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", dict)

_SEGMENT_SPLIT = re.compile(r"[/\\]")


def has_dot_dot(raw_path: str) -> bool:
    """True if any path segment is `..`, however it is percent-encoded (also doubly)."""
    path = raw_path.split("?", 1)[0]
    for _ in range(3):
        if ".." in _SEGMENT_SPLIT.split(path):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return ".." in _SEGMENT_SPLIT.split(path)


def _key_matches(given: str, keys: list[bytes]) -> bool:
    """Constant-time against every key: the time taken says nothing about which key came close."""
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


def _inbound_key(request: web.Request, flow: Flow) -> str:
    key = request.headers.get("api-key")
    if key is None and flow is not Flow.ON_BEHALF_OF:
        # the plain OpenAI client sends its api_key as a bearer token
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
    return key or ""


def build_middleware(settings: Settings, metrics: Metrics, state: dict[str, object]) -> Callable[..., object]:
    keys = [key.get_secret_value().encode() for key in settings.inbound.api_keys]
    flow = settings.auth.flow
    log_access = settings.logging.access_log

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        state["in_flight"] = int(state["in_flight"]) + 1  # type: ignore[call-overload]
        response: web.StreamResponse | None = None
        try:
            if has_dot_dot(request.raw_path):
                response = error_response(400, "InvalidPath", "path segments '..' are not allowed", retryable=False)
            elif keys and request.path.startswith("/openai/") and not _key_matches(_inbound_key(request, flow), keys):
                response = error_response(
                    401, "Unauthorized", "missing or wrong api-key for this sidecar (inbound.api_keys)",
                    retryable=False,
                )
            else:
                response = await handler(request)
            if state["draining"]:
                response.force_close()  # push keep-alive callers to another replica while we drain
            return response
        except web.HTTPException as exc:
            response = error_response(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
            return response
        finally:
            state["in_flight"] = int(state["in_flight"]) - 1  # type: ignore[call-overload]
            _account(request, response, started, metrics, log_access)

    return guard


def _account(
    request: web.Request,
    response: web.StreamResponse | None,
    started: float,
    metrics: Metrics,
    log_access: bool,
) -> None:
    exchange = request.get(EXCHANGE)
    route = exchange.route if exchange else route_family(request.path)
    status = response.status if response is not None else 499  # 499: the caller went away
    metrics.requests.labels(request.method, f"{status // 100}xx", route).inc()
    if exchange is not None:
        metrics.bytes_in.inc(exchange.bytes_in)
    if log_access and route != "sidecar":
        access_log.info(
            "%s %s %s %d %.1fms",
            request.method,
            route,
            request.headers.get("x-ms-client-request-id") or "-",
            status,
            (time.monotonic() - started) * 1000,
            extra={
                "request_id": request.headers.get("x-ms-client-request-id")
                or request.headers.get("x-request-id"),
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": round((time.monotonic() - started) * 1000, 2),
                "bytes_in": exchange.bytes_in if exchange else 0,
                "bytes_out": exchange.bytes_out if exchange else 0,
                "upstream_status": exchange.upstream_status if exchange else None,
            },
        )


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
        middlewares=[build_middleware(settings, metrics, state)],
        client_max_size=1024**4,  # bodies stream; this only bounds request.read() of small replayable ones
        handler_args={"auto_decompress": False},
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STATE] = state
    if authorizer is None:
        authorizer = build_authorizer(settings, observer=metrics.observe_token, retry=retry)
    app[AUTHORIZER] = authorizer
    metrics.track_expiry(authorizer.seconds_until_expiry)
    proxy = Proxy(
        upstream_url=settings.upstream.url,
        authorizer=authorizer,
        metrics=metrics,
        extra_headers=_static_upstream_headers(settings),
        audience=settings.auth.audience,
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=0,  # streams are long: a pool cap would queue callers behind them
            ssl=client_ssl_context(settings.tls.ca_bundle),
            enable_cleanup_closed=False,
            keepalive_timeout=30,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass untouched, Content-Encoding included
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.upstream.connect_timeout,
                sock_read=settings.upstream.read_timeout,  # idle time between bytes, never a total
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies must never reach another's request
            trust_env=False,
        )
        proxy.attach(session)
        await authorizer.start()
        try:
            yield
        finally:
            await authorizer.aclose()
            await session.close()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        if state["draining"]:
            return web.json_response({"status": "draining"}, status=503)
        if authorizer.is_ready():
            return web.json_response({"status": "ready", "flow": authorizer.flow})
        error = getattr(authorizer, "last_error", None)
        detail = error.one_line() if error is not None else "waiting for the first token"
        return web.json_response({"status": "not ready", "flow": authorizer.flow, "reason": detail}, status=503)

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("*", "/openai/{tail:.*}", proxy.handle)
    app.router.add_route("*", "/{tail:.*}", not_found)
    app.cleanup_ctx.append(lifecycle)
    return app


async def not_found(request: web.Request) -> web.Response:
    return error_response(
        404, "NotFound", "the sidecar forwards /openai/... only (and serves /healthz, /readyz, /metrics)",
        retryable=False,
    )
