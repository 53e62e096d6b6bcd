"""Run one aiohttp application on a host/port, with the settings every emulator wants."""

from __future__ import annotations

import asyncio
import ssl
from typing import NoReturn, Self

from aiohttp import web

# Hanging or streaming handlers must not hold up stop(): give them this long, then cancel.
SHUTDOWN_TIMEOUT = 0.25


class Emulator:
    """`async with` support for every emulator: start on entry, stop on exit (subclasses define both)."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class AppServer:
    """Owns the ``AppRunner``/``TCPSite`` pair of one emulator."""

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        auto_decompress: bool = True,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._auto_decompress = auto_decompress
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("server not started")
        return self._bound_port

    @property
    def running(self) -> bool:
        return self._runner is not None

    def base_url(self, advertised_host: str | None = None) -> str:
        """``scheme://host:port``; wildcard binds are advertised as loopback unless told otherwise."""
        scheme = "https" if self._ssl_context else "http"
        host = advertised_host or _connectable_host(self._host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("server already started")
        runner = web.AppRunner(
            self._app,
            # Cancel the handler when the client goes away, so streams notice disconnects.
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            # RequestHandler option: keep request bodies as sent (e.g. gzip) for hashing.
            auto_decompress=self._auto_decompress,
            access_log=None,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, ssl_context=self._ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        transports = [h.transport for h in runner.server.connections] if runner.server else []
        await runner.cleanup()
        # A closed TLS connection waits (up to 30 s) for the client's close_notify; an idle
        # keep-alive client never sends it, so the socket would outlive the event loop.
        for transport in transports:
            if transport is not None:
                transport.abort()


def _connectable_host(bind_host: str) -> str:
    if bind_host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def drop_connection(request: web.BaseRequest) -> NoReturn:
    """Abort the TCP connection without an HTTP answer (the client sees a reset/EOF).

    Raising CancelledError ends the handler quietly: aiohttp treats it like a client
    disconnect and does not log a traceback or try to write a 500.
    """
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise asyncio.CancelledError
