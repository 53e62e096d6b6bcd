"""The sidecar's own endpoints: liveness, readiness and metrics. The main listener serves them beside
`/openai/`; the admin listener (`admin.port`) serves them alone, for probes and scrapers that must not reach
the proxy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from sidecar.errors import error_response
from sidecar.metrics import CONTENT_TYPE_LATEST
from sidecar.tokens.base import Authorizer

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Render = Callable[[], Awaitable[bytes]]  # the Prometheus exposition: one process's, or a pod's (sidecar/pod.py)


def own_routes(
    state: dict[str, object], authorizers: Sequence[Authorizer], render: Render | None
) -> dict[str, Handler]:
    """Path -> handler for GET/HEAD; `state["draining"]` makes readiness fail while the process drains. Ready
    means every route's authorizer is (one per scope). /metrics only with `render`."""

    async def healthz(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.BaseRequest) -> web.Response:
        if state["draining"]:
            return web.json_response({"status": "draining"}, status=503)
        waiting = [authorizer for authorizer in authorizers if not authorizer.is_ready()]
        if not waiting:
            return web.json_response({"status": "ready", "flow": authorizers[0].flow})
        authorizer = waiting[0]
        error = authorizer.last_error
        detail = error.one_line() if error is not None else "waiting for the first token"
        return web.json_response({"status": "not ready", "flow": authorizer.flow, "reason": detail}, status=503)

    routes: dict[str, Handler] = {"/healthz": healthz, "/readyz": readyz}
    if render is not None:

        async def metrics_endpoint(request: web.BaseRequest) -> web.Response:
            return web.Response(body=await render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        routes["/metrics"] = metrics_endpoint
    return routes


def admin_handler(routes: dict[str, Handler]) -> Handler:
    """The admin listener's one handler: its own routes by exact path, 404 for everything else (no proxying)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        handler = routes.get(request.rel_url.path) if request.method in ("GET", "HEAD") else None
        if handler is None:
            return error_response(
                404, "NotFound", "the admin listener serves /healthz, /readyz and /metrics only", retryable=False
            )
        return await handler(request)

    return handle
