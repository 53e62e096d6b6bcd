"""Running the app: listen, warn about exposure, drain gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from sidecar.accesslog import batch_access_log
from sidecar.app import ADMIN, DISPATCH, STATE, WEBSOCKETS, AuthorizerFactory, build_app
from sidecar.config import ConfigError, Settings, is_loopback
from sidecar.health import Handler
from sidecar.metrics import Metrics
from sidecar.tokens.manager import RetryPolicy

log = logging.getLogger("sidecar")


def warn_if_exposed(settings: Settings) -> None:
    inbound = settings.inbound
    if not is_loopback(settings.listen.host) and not inbound.api_keys and inbound.api_keys_file is None:
        log.warning(
            "!!! listening on %s without inbound.api_keys: anyone who can reach this port gets requests signed "
            "with this identity's token. Set inbound.api_keys (or inbound.api_keys_file), or listen on "
            "127.0.0.1. !!!",
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


class _QuietMalformed(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logs every request it cannot parse (bad framing, an oversized header, HTTP/9.9) as an
    ERROR with a traceback: any caller could fill the log and page on-call. Those become one INFO line with the
    error's class and the peer; anything else (a bug of ours) keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: object) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else "unknown"
            self.logger.info("malformed request from %s: %s", peer, type(exc_info).__name__)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


def make_runner(app: web.Application, settings: Settings) -> web.AppRunner:
    return web.AppRunner(
        app,
        handler_cancellation=True,  # a caller that disconnects cancels its handler, closing the upstream
        access_log=None,  # dispatch writes one line per request (sidecar/accesslog.py)
        shutdown_timeout=1.0,  # draining happens before cleanup, see serve()
        auto_decompress=False,
        keepalive_timeout=settings.listen.keepalive_timeout,
        logger=_QuietMalformed(logging.getLogger("sidecar.http"), {}),
    )


class ConnectionGuard:
    """Bounds what callers can hold: connections past `max_connections` are closed before aiohttp sees them,
    and a connection that has not delivered its first request head within `header_timeout` is closed
    (slow-header callers). It is the protocol factory of the listening socket: every connection passes it.
    """

    def __init__(self, server: Server, *, max_connections: int, header_timeout: float) -> None:
        self._server = server
        self._max = max_connections
        self._header_timeout = header_timeout
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self, self._server())


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's RequestHandler behind the guard. The transport calls the handler's own methods for data and
    flow control (bound at construction: no extra frame per read); only the connection's start and end pass
    through here."""

    def __init__(self, guard: ConnectionGuard, handler: RequestHandler) -> None:
        self._guard = guard
        self._handler: RequestHandler | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.data_received = handler.data_received  # type: ignore[method-assign]
        self.eof_received = handler.eof_received  # type: ignore[method-assign]
        self.pause_writing = handler.pause_writing  # type: ignore[method-assign]
        self.resume_writing = handler.resume_writing  # type: ignore[method-assign]
        self._pending = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        guard.open += 1
        if guard.open > guard._max:
            guard.refused += 1
            transport.close()  # aiohttp never sees this connection
            return
        self._handler = self._pending
        self._handler.connection_made(transport)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(guard._header_timeout, _close_if_silent, self._handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.open -= 1
        if self._deadline is not None:
            self._deadline.cancel()
        if self._handler is not None:
            self._handler.connection_lost(exc)


def _close_if_silent(handler: RequestHandler) -> None:
    # aiohttp counts the request heads a connection delivered (private, hence the pinned minor version;
    # tests/test_hostile.py fails if it changes meaning)
    if handler._request_count == 0:
        handler.force_close()


class GuardedSite(web.TCPSite):
    """aiohttp's TCPSite, with a ConnectionGuard between the listening socket and aiohttp's server. It listens
    on `sock` when given one (already bound), else on `host`/`port`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        header_timeout: float,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._sock = sock
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, max_connections=self._max_connections, header_timeout=self._header_timeout)
        # TCPSite.start's own steps (aiohttp 3.14), with the guard as the protocol factory
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(self.guard, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                self.guard, self._host, self._port, backlog=self._backlog, reuse_address=True
            )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


# Probes and scrapers open a few connections at a time; a flood past this is closed before aiohttp sees it.
ADMIN_MAX_CONNECTIONS = 128


@dataclass
class RunningSidecar:
    """A started sidecar; `url` has the real port when the config asked for port 0."""

    app: web.Application
    runner: web.AppRunner
    site: GuardedSite
    url: str
    admin: web.ServerRunner | None = None  # the admin listener (admin.port), if configured
    admin_url: str | None = None

    async def aclose(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            if self.admin is not None:
                await self.admin.cleanup()


async def start(
    settings: Settings,
    *,
    make_authorizer: AuthorizerFactory | None = None,
    retry: RetryPolicy | None = None,
    sock: socket.socket | None = None,
    metrics: Metrics | None = None,
    admin: bool = True,
) -> RunningSidecar:
    """Build and start the app; it listens on `sock` when given one (bound by the caller), else on `listen`.
    `admin`: open the admin listener (admin.port) too; a worker's parent opens it for the whole pod instead."""
    app = build_app(settings, make_authorizer=make_authorizer, retry=retry, metrics=metrics)
    runner = make_runner(app, settings)
    await runner.setup()
    if runner.server is not None:
        # The app routes every path to one function; calling it directly skips aiohttp's router and
        # Application._handle (see build_dispatch). No connection exists yet: all of them use it.
        runner.server.request_handler = app[DISPATCH]
    listen = settings.listen
    site = GuardedSite(
        runner,
        listen.host,
        listen.port,
        max_connections=listen.max_connections,
        header_timeout=listen.header_timeout,
        sock=sock,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise cannot_listen("listen", settings.listen.host, settings.listen.port, exc) from None
    running = RunningSidecar(app, runner, site, _url(settings.listen.host, site.port))
    if admin and settings.admin.port is not None:
        try:
            running.admin, running.admin_url = await start_admin(app[ADMIN], settings)
        except BaseException:
            await runner.cleanup()
            raise
    return running


async def start_admin(
    handler: Handler, settings: Settings, *, sock: socket.socket | None = None
) -> tuple[web.ServerRunner, str]:
    """The admin listener: aiohttp's low-level server with one handler (health, readiness, metrics), on `sock`
    when given one (bound by the caller), else on admin.host/admin.port."""
    host, port = settings.admin.host, settings.admin.port
    assert port is not None
    runner = web.ServerRunner(web.Server(handler), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    # It is on the pod IP: bounded like the main listener, so that nobody who can reach it holds the process's
    # memory or descriptors (the ones its token requests need) with idle or slow connections.
    site = GuardedSite(
        runner,
        host,
        port,
        max_connections=ADMIN_MAX_CONNECTIONS,
        header_timeout=settings.listen.header_timeout,
        sock=sock,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise cannot_listen("admin", host, port, exc) from None
    return runner, _url(host, site.port)


def cannot_listen(section: str, host: str, port: int, error: OSError) -> ConfigError:
    """A listener that cannot open is the operator's to fix (the port is taken, the address is not this host's):
    one line naming the keys, exit 2, no traceback."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    fixes = {
        errno.EADDRINUSE: f"stop what holds the port or choose another ({section}.port)",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this host: set {section}.host to one (or 0.0.0.0)",
        errno.EACCES: f"ports below 1024 need privileges: choose {section}.port above 1023",
    }
    fix = fixes.get(error.errno or 0, f"check {section}.host and {section}.port")
    return ConfigError(
        [f"{section}.host/{section}.port: cannot listen on {_url(host, port)[7:]}: {reason.lower()}; {fix}"]
    )


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    make_authorizer: AuthorizerFactory | None = None,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
    whole_process: bool = False,
    metrics: Metrics | None = None,
    admin: bool = True,
) -> int:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain.

    `sock`: a socket the caller bound (and announces); `whole_process`: this process does nothing but serve, so
    process-wide tuning applies; `metrics`, `admin`: see start().
    """
    running = await start(settings, make_authorizer=make_authorizer, sock=sock, metrics=metrics, admin=admin)
    app, site = running.app, running.site
    unbatch = batch_access_log(asyncio.get_running_loop())
    if sock is None:  # who bound the socket says where it listens (workers: their parent, once for all)
        warn_if_exposed(settings)
        log.info(
            "sidecar listening on %s -> %s (flow %s)%s",
            running.url,
            ", ".join(f"{route.prefix} -> {route.upstream[0].url}" for route in settings.effective_routes()),
            settings.auth.flow.value,
            f"; admin (health, readiness, metrics) on {running.admin_url}" if running.admin_url else "",
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
            await running.aclose()  # a second SIGTERM meanwhile (a worker gets one from its parent too) is absorbed
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            unbatch()
    log.info("stopped")
    return 0


async def drain(app: web.Application, site: web.BaseSite, grace: float) -> None:
    """Readiness fails at once, the listener closes, and in-flight requests get `grace` seconds to finish;
    WebSocket sessions still open then are closed with 1001 (going away) on both legs."""
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
        await asyncio.gather(*(relay.close_all() for relay in app[WEBSOCKETS]))
    with contextlib.suppress(Exception):
        await site.stop()
