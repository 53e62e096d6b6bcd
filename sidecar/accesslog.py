"""The access log: one line per proxied request, cheap enough for the request path.

`logger.info(msg, *args, extra=...)` cost about 15 µs per line here: logging looks up the caller's source
line (findCaller), LogRecord.__init__ looks up the thread, process and their names, the handler writes and
flushes once per line. AccessLog fills the same record's fields itself (the constant ones once) and hands
it to the logger's handlers, so the level, the redaction filter and the text/JSON formats stay exactly those
that sidecar.logs configured; `batch_access_log` then turns one write per line into one per 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sidecar.exchange import Exchange

# method route status duration, then key=value fields ("-" when absent): greppable, and stable for parsers
_NO_EXCHANGE = Exchange()  # requests the sidecar answered itself: nothing went upstream
_MESSAGE = (
    "%s %s %d %.1fms ttfb=%s in=%d out=%d backend=%s request_id=%s apim_request_id=%s upstream_request_id=%s region=%s"
)


class AccessLog:
    """Writes access lines to `logger`; made per app, on the event loop's thread, after any fork."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        thread = threading.current_thread()
        # what LogRecord.__init__ would look up for every line; none of it changes for this app
        self._constant: dict[str, Any] = {
            "name": logger.name, "levelno": logging.INFO, "levelname": "INFO",
            "pathname": __file__, "filename": "accesslog.py", "module": "accesslog", "funcName": "log",
            "lineno": 0, "msg": _MESSAGE, "exc_info": None, "exc_text": None, "stack_info": None,
            "thread": thread.ident, "threadName": thread.name, "process": os.getpid(), "processName": "MainProcess",
            "taskName": None,
        }  # fmt: skip
        self._start_time = float(getattr(logging, "_startTime", time.time()))

    def log(self, request: web.BaseRequest, route: str, status: int, started: float, exchange: Exchange | None) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        headers = request.headers
        request_id = headers.get("x-ms-client-request-id") or headers.get("x-request-id")
        elapsed_ms = (time.monotonic() - started) * 1000
        exchange = exchange or _NO_EXCHANGE
        ttfb_ms = None if exchange.ttfb is None else round(exchange.ttfb * 1000, 2)
        apim, upstream_id, region = exchange.upstream_ids
        method = request.method
        created = time.time()
        record = logging.LogRecord.__new__(logging.LogRecord)
        fields = record.__dict__
        fields.update(self._constant)
        fields.update(
            created=created,
            msecs=int((created - int(created)) * 1000) + 0.0,
            relativeCreated=(created - self._start_time) * 1000,
            args=(
                method,
                route,
                status,
                elapsed_ms,
                "-" if ttfb_ms is None else f"{ttfb_ms:.1f}ms",
                exchange.bytes_in,
                exchange.bytes_out,
                exchange.backend or "-",
                request_id or "-",
                apim or "-",
                upstream_id or "-",
                region or "-",
            ),
            # the JSON format's fields (sidecar.logs._ACCESS_FIELDS)
            request_id=request_id,
            method=method,
            route=route,
            status=status,
            duration_ms=round(elapsed_ms, 2),
            ttfb_ms=ttfb_ms,
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            upstream_status=exchange.upstream_status,
            backend=exchange.backend,
            apim_request_id=apim,
            upstream_request_id=upstream_id,
            region=region,
        )
        logger.handle(record)


class BatchingHandler(logging.Handler):
    """Access lines written in batches: one write per 100 ms (or 64 KiB) instead of one syscall per request.

    It formats and filters (redacts) each record exactly as the handler it stands in for; only the write
    is deferred, so a line reaches the log at most `interval` seconds late. Records come from the event
    loop's thread only, which also runs the timer.
    """

    def __init__(
        self,
        target: logging.StreamHandler[Any],
        loop: asyncio.AbstractEventLoop,
        interval: float = 0.1,
        max_bytes: int = 64 * 1024,
    ) -> None:
        super().__init__(target.level)
        self.setFormatter(target.formatter)
        for item in target.filters:
            self.addFilter(item)
        self._stream = target.stream
        self._loop = loop
        self._interval = interval
        self._max_bytes = max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self._max_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not break serving
            self._stream.write(text)
            self._stream.flush()


def batch_access_log(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Route `sidecar.access` through a BatchingHandler for the root's one stream handler (what
    sidecar.logs.configure sets up); returns the undo, which flushes. Any other logging set-up is left as is."""
    logger = logging.getLogger("sidecar.access")
    handlers = logging.getLogger().handlers
    if len(handlers) != 1 or not isinstance(handlers[0], logging.StreamHandler) or logger.handlers:
        return lambda: None
    handler = BatchingHandler(handlers[0], loop)
    logger.addHandler(handler)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.flush()
        handler.close()

    return undo
