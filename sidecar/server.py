"""Running the app: listen, warn about exposure, drain gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from sidecar.accesslog import batch_access_log
from sidecar.app import DISPATCH, STATE, build_app
from sidecar.config import Settings
from sidecar.tokens.base import Authorizer
from sidecar.tokens.manager import RetryPolicy

log = logging.getLogger("sidecar")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> None:
    if not is_loopback(settings.listen.host) and not settings.inbound.api_keys:
        log.warning(
            "!!! listening on %s without inbound.api_keys: anyone who can reach this port gets requests signed "
            "with this identity's token. Set inbound.api_keys, or listen on 127.0.0.1. !!!",
            settings.listen.host,
        )


# Request objects die by reference count; only the few cycles (exceptions, some of aiohttp's objects) need the
# collector. With the default threshold (700) it ran ~180 times a second at 64 connections, and each full
# collection walked every start-up object: ~30 ms with every request in flight stalled (bench/README.md).
GEN0_THRESHOLD = 20_000


def settle_gc() -> None:
    """Once the process serves: set start-up objects aside from the collector and collect young objects less often.

    Modules, config, the app and the libraries' objects live until exit; gc.freeze() takes them out of every
    later collection, so a full one walks only what requests created. For the serving process only (the CLI):
    it changes process-wide state.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handler_cancellation=True,  # a caller that disconnects cancels its handler, closing the upstream
        access_log=None,  # the guard middleware writes one line per request
        shutdown_timeout=1.0,  # draining happens before cleanup, see serve()
        auto_decompress=False,
    )


@dataclass
class RunningSidecar:
    """A started sidecar; `url` has the real port when the config asked for port 0."""

    app: web.Application
    runner: web.AppRunner
    site: web.TCPSite
    url: str

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start(
    settings: Settings,
    *,
    authorizer: Authorizer | None = None,
    retry: RetryPolicy | None = None,
    reuse_port: bool = False,
) -> RunningSidecar:
    """Build and start the app. `reuse_port`: one of several worker processes listening on the same port."""
    app = build_app(settings, authorizer=authorizer, retry=retry)
    runner = make_runner(app, settings)
    await runner.setup()
    if runner.server is not None:
        # The app routes every path to one function; calling it directly skips aiohttp's router and
        # Application._handle (see build_dispatch). No connection exists yet: all of them use it.
        runner.server.request_handler = app[DISPATCH]
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_address=True, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server = site._server
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else settings.listen.port
    host = settings.listen.host
    shown = f"[{host}]" if ":" in host else host
    return RunningSidecar(app, runner, site, f"http://{shown}:{port}")


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    authorizer: Authorizer | None = None,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
    whole_process: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain. Workers pass their authorizer and port.

    `whole_process`: this process does nothing but serve (the CLI, a worker), so process-wide tuning applies.
    """
    running = await start(settings, authorizer=authorizer, reuse_port=reuse_port)
    app, runner, site = running.app, running.runner, running.site
    unbatch = batch_access_log(asyncio.get_running_loop())
    if not reuse_port:  # a worker: the parent says this once for all of them
        warn_if_exposed(settings)
        log.info(
            "sidecar listening on %s -> %s (flow %s)",
            running.url,
            settings.upstream.url,
            settings.auth.flow.value,
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if whole_process:
        settle_gc()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.0f s", settings.shutdown_grace)
        await drain(app, site, settings.shutdown_grace)
    finally:
        try:
            await runner.cleanup()  # a second SIGTERM meanwhile (a worker gets one from its parent too) is absorbed
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            unbatch()
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
