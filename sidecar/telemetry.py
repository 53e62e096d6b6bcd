"""OpenTelemetry traces, opt-in: `telemetry.otlp_endpoint` (or OTEL_EXPORTER_OTLP_ENDPOINT) and the `otel` extra.

app.py imports this module only when telemetry is on. With it off no opentelemetry module is loaded and nothing
on the request path checks a flag: the traced pieces wrap the untraced ones once, when the app is built.

Spans, exported in batches over OTLP/HTTP (protobuf) by the SDK's BatchSpanProcessor, on its own thread:
- server (`POST chat.completions`): one per request through dispatch, except the sidecar's own routes (health
  probes and scrapes would drown the rest). A caller's W3C `traceparent` is continued.
- client (same name, kind client): one per upstream request (a 401 replay makes a second), child of the server
  span, from the send to the response head; the upstream gets its `traceparent` in place of the caller's.
- `token fetch`: one per identity-provider call, with the flow and the outcome. The manager reports a call
  when it ends (flow, outcome, seconds), so the span is built then, starting that many seconds earlier.

Attributes: the method, the route family (sidecar/routes.py), the status, the upstream's address and port.
Never a header value, a path (it names deployments), a query string (it may carry a key), a token or a secret.

Why not the official aiohttp instrumentations: the server one is an Application middleware, and dispatch
bypasses the Application (app.build_dispatch). The client one would fit the upstream side only as a
trace_config on the Pool's session, where it records url.full with the query string (its redaction knows a few
cloud-storage signature names, not `api-key`), injects through the global propagator, and turns on aiohttp's
per-request tracing signals; it also brings opentelemetry-instrumentation and wrapt. Three explicit spans take
fewer lines than configuring those would, and show exactly what leaves the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from sidecar import __version__
from sidecar.config import TelemetryConfig
from sidecar.exchange import EXCHANGE
from sidecar.health import Handler
from sidecar.routes import route_family
from sidecar.tokens.manager import TokenObserver
from sidecar.upstream import Response, Send

log = logging.getLogger("sidecar.telemetry")

# The spans still queued at shutdown get this long to leave; a collector that is down must not hold up exit.
FLUSH_SECONDS = 5.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})  # the caller's are replaced by ours


class Telemetry:
    """One app's tracer provider and the wrappers that trace dispatch, the upstream call and token fetches.

    The provider (and the exporter's thread) starts with the app, in the serving process, so a worker forked
    by `workers: N` has its own; until then spans go nowhere.
    """

    def __init__(self, config: TelemetryConfig) -> None:
        assert config.otlp_endpoint is not None, "built only when telemetry is on"
        self._config = config
        self._endpoint = config.otlp_endpoint + "/v1/traces"
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        self._propagator = TraceContextTextMapPropagator()

    def start(self) -> None:
        resource = Resource.create({"service.name": self._config.service_name, "service.version": __version__})
        provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(self._config.sample_ratio)),
            shutdown_on_exit=False,  # aclose() flushes, within a bound; no atexit hook holding the app alive
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self._endpoint)))
        self._provider = provider
        self._tracer = provider.get_tracer("sidecar", __version__)
        log.info("tracing: OTLP/HTTP to %s as service %s", self._endpoint, self._config.service_name)

    async def aclose(self) -> None:
        """Export what is queued, waiting at most FLUSH_SECONDS (the exporter's thread may go on; it is a daemon)."""
        provider, self._provider = self._provider, None
        self._tracer = trace.NoOpTracer()
        if provider is None:
            return
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shut_down() -> None:
            try:
                provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed while we waited: nobody listens
                    loop.call_soon_threadsafe(done.set)

        # not the loop's default executor: asyncio.run() would wait for a hanging export at exit
        threading.Thread(target=shut_down, name="sidecar-telemetry-flush", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), FLUSH_SECONDS)
        except TimeoutError:
            log.warning("tracing: the collector took over %.0f s; spans still queued are dropped", FLUSH_SECONDS)

    def dispatch(self, inner: Handler) -> Handler:
        """dispatch inside a server span that continues the caller's trace."""
        propagator = self._propagator

        async def traced(request: web.BaseRequest) -> web.StreamResponse:
            route = route_family(request.path)
            if route == "sidecar":
                return await inner(request)
            headers = request.headers
            parent = propagator.extract(headers) if "traceparent" in headers else None
            method = request.method if request.method in _METHODS else "_OTHER"
            span = self._tracer.start_span(
                f"{method} {route}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "sidecar.route": route, "url.scheme": request.scheme},
            )
            token = context.attach(trace.set_span_in_context(span))
            status = 500  # an exception of ours: aiohttp answers 500
            try:
                response = await inner(request)
                status = response.status
                return response
            except asyncio.CancelledError:
                exchange = request.get(EXCHANGE)
                delivered = exchange.delivered if exchange is not None else None
                status = 499 if delivered is None else delivered  # as the metrics count it (app._account)
                raise
            finally:
                context.detach(token)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(StatusCode.ERROR)
                span.end()

        return traced

    def send(self, inner: Send, upstream_url: str) -> Send:
        """The upstream call (to one backend) inside a client span, its traceparent sent in place of the caller's."""
        propagator = self._propagator
        upstream = URL(upstream_url)
        fixed = {
            "server.address": upstream.host or "",
            "server.port": upstream.port or 0,
            "url.scheme": upstream.scheme,
        }

        async def traced(
            method: str,
            path_qs: str,
            headers: Iterable[tuple[str, str]],
            *,
            body: bytes | None,
            stream: aiohttp.StreamReader | None = None,
            stream_length: int | None = None,
        ) -> Response:
            label = method if method in _METHODS else "_OTHER"
            route = route_family(path_qs.partition("?")[0])
            span = self._tracer.start_span(
                f"{label} {route}",
                kind=SpanKind.CLIENT,
                attributes={"http.request.method": label, "sidecar.route": route, **fixed},
            )
            carrier: dict[str, str] = {}
            propagator.inject(carrier, context=trace.set_span_in_context(span))
            outgoing = [(name, value) for name, value in headers if name.lower() not in _TRACE_HEADERS]
            outgoing += carrier.items()
            try:
                response = await inner(method, path_qs, outgoing, body=body, stream=stream, stream_length=stream_length)
            except BaseException as exc:  # unreachable, timed out, cancelled (the caller left)
                span.set_attribute("error.type", type(exc).__name__)  # a class name: never the message
                span.set_status(StatusCode.ERROR)
                span.end()
                raise
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                span.set_attribute("error.type", str(response.status))
                span.set_status(StatusCode.ERROR)
            span.end()
            return response

        return traced

    def observer(self, inner: TokenObserver) -> TokenObserver:
        """The token observer (the metrics') plus a span per identity-provider call."""

        def observe(flow: str, outcome: str, seconds: float) -> None:
            inner(flow, outcome, seconds)
            ended = time.time_ns()
            span = self._tracer.start_span(
                "token fetch",
                start_time=ended - int(seconds * 1e9),
                attributes={"sidecar.token.flow": flow, "sidecar.token.outcome": outcome},
            )
            if outcome != "success":
                span.set_status(StatusCode.ERROR)
            span.end(end_time=ended)

        return observe
