"""Running the app: listen, warn about exposure, drain gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time

from aiohttp import web

from sidecar.app import STATE, build_app
from sidecar.config import Settings

log = logging.getLogger("sidecar")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handler_cancellation=True,  # a caller that disconnects cancels its handler, closing the upstream
        access_log=None,  # the guard middleware writes one line per request
        shutdown_timeout=1.0,  # draining happens before cleanup, see serve()
        auto_decompress=False,
    )


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> int:
    app = build_app(settings)
    runner = make_runner(app, settings)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_address=True)
    await site.start()
    if not is_loopback(settings.listen.host) and not settings.inbound.api_keys:
        log.warning(
            "!!! listening on %s without inbound.api_keys: anyone who can reach this port gets requests signed "
            "with this identity's token. Set inbound.api_keys, or listen on 127.0.0.1. !!!",
            settings.listen.host,
        )
    log.info(
        "sidecar listening on http://%s:%d -> %s (flow %s)",
        settings.listen.host, settings.listen.port, settings.upstream.url, settings.auth.flow.value,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.0f s", settings.shutdown_grace)
        await drain(app, site, settings.shutdown_grace)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
    log.info("stopped")
    return 0


async def drain(app: web.Application, site: web.BaseSite, grace: float) -> None:
    """Readiness fails at once, the listener closes, and in-flight requests get `grace` seconds to finish."""
    state = app[STATE]
    state["draining"] = True
    server = getattr(site, "_server", None)
    if server is not None:
        server.close()  # stop accepting; open connections (and their streams) carry on
    deadline = time.monotonic() + grace
    while state["in_flight"] and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a counter is simplest
        await asyncio.sleep(0.05)
    if state["in_flight"]:
        log.warning("grace period over with %s request(s) still open; closing them", state["in_flight"])
    with contextlib.suppress(Exception):
        await site.stop()
