"""Prometheus metrics, one set per app (no global state), with bounded label sets only.

The request path only adds to plain integers and bucket lists; a collector turns them into Prometheus
families when /metrics is scraped. Why not prometheus_client's Counter/Histogram objects on the hot path:
each `labels(...)` lookup and observation takes a lock and a few microseconds, which profiling showed as
several percent of the sidecar's CPU per proxied request. Everything runs on the event loop's thread, so
plain integers need no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from sidecar import __version__

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_CODES = frozenset(int(status) for status in HTTPStatus) | {499}  # 499: the caller left before the answer ended
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """Observations per bucket (not yet cumulative) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1  # the first bucket with le >= value
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*_LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


class Metrics:
    def __init__(self, *, process: bool = True) -> None:
        """`process`: also export this process's own families (process_*, python_*)."""
        self.requests: dict[tuple[str, int, str], int] = {}  # (method, status code or 0, route) -> count
        # (configured route prefix, backend name, status code or 0) -> count: bounded by the configuration
        self.backend_responses: dict[tuple[str, str, int], int] = {}
        self.cooldowns: dict[tuple[str, str], int] = {}  # (route prefix, backend name) -> times cooled down
        self.upstream_latency: dict[str, Histogram] = {}
        self.upstream_ttfb: dict[str, Histogram] = {}
        self.active_streams = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.token_acquisitions: dict[tuple[str, str], int] = {}  # (flow, outcome) -> count
        self.idp_latency: dict[str, Histogram] = {}
        self.websockets_open = 0
        self.websocket_sessions: dict[str, int] = {}  # who ended it -> count
        self.websocket_frames: dict[tuple[str, str], int] = {}  # (direction, text/binary) -> count
        self.websocket_bytes: dict[str, int] = {}  # direction -> payload bytes
        self._expiry: Callable[[], float | None] = lambda: None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        if process:
            # the process's own: resident memory, CPU, descriptors (process_*), the interpreter and its collector
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # -- the request path: plain arithmetic --------------------------------------------------------

    def count_request(self, method: str, status: int, route: str, bytes_in: int) -> None:
        # bounded labels: any method or status a caller or an upstream sends beyond the standard ones is "other"
        key = (method if method in _METHODS else "other", status if status in _CODES else 0, route)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.bytes_in += bytes_in

    def count_backend(self, route: str, backend: str, status: int) -> None:
        key = (route, backend, status if status in _CODES else 0)
        self.backend_responses[key] = self.backend_responses.get(key, 0) + 1

    def count_cooldown(self, route: str, backend: str) -> None:
        key = (route, backend)
        self.cooldowns[key] = self.cooldowns.get(key, 0) + 1

    def observe_ttfb(self, route: str, seconds: float) -> None:
        _histogram(self.upstream_ttfb, route).observe(seconds)

    def stream_started(self) -> None:
        self.active_streams += 1

    def stream_ended(self, route: str, bytes_out: int, seconds: float) -> None:
        self.active_streams -= 1
        self.bytes_out += bytes_out
        _histogram(self.upstream_latency, route).observe(seconds)

    def websocket_opened(self) -> None:
        self.websockets_open += 1

    def websocket_closed(self, ended_by: str) -> None:
        self.websockets_open -= 1
        self.websocket_sessions[ended_by] = self.websocket_sessions.get(ended_by, 0) + 1

    def count_frame(self, direction: str, kind: str, size: int) -> None:
        key = (direction, kind)
        frames = self.websocket_frames
        frames[key] = frames.get(key, 0) + 1
        self.websocket_bytes[direction] = self.websocket_bytes.get(direction, 0) + size

    def observe_token(self, flow: str, outcome: str, seconds: float) -> None:
        key = (flow, outcome)
        self.token_acquisitions[key] = self.token_acquisitions.get(key, 0) + 1
        _histogram(self.idp_latency, flow).observe(seconds)

    def track_expiry(self, seconds_left: Callable[[], float | None]) -> None:
        self._expiry = seconds_left

    def seconds_until_expiry(self) -> float:
        value = self._expiry()
        return -1.0 if value is None else value

    async def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- adding up processes (`workers: N`, sidecar/pod.py) ----------------------------------------

    def traffic(self) -> dict[str, Any]:
        """What this process served, as JSON-ready data that `add_traffic` adds to another Metrics. Not the
        identity-provider calls: with workers the parent makes (and counts) them."""
        return {
            "requests": [[*key, count] for key, count in self.requests.items()],
            "backend_responses": [[*key, count] for key, count in self.backend_responses.items()],
            "cooldowns": [[*key, count] for key, count in self.cooldowns.items()],
            "upstream_latency": {route: [h.counts, h.total] for route, h in self.upstream_latency.items()},
            "upstream_ttfb": {route: [h.counts, h.total] for route, h in self.upstream_ttfb.items()},
            "websocket_sessions": self.websocket_sessions,
            "websocket_frames": [[*key, count] for key, count in self.websocket_frames.items()],
            "websocket_bytes": self.websocket_bytes,
            "gauges": [self.active_streams, self.bytes_in, self.bytes_out, self.websockets_open],
        }

    def add_traffic(self, traffic: dict[str, Any]) -> None:
        for name in ("requests", "backend_responses", "cooldowns", "websocket_frames"):
            counts: dict[tuple[Any, ...], int] = getattr(self, name)
            for *key, count in traffic[name]:
                counts[tuple(key)] = counts.get(tuple(key), 0) + count
        for name in ("websocket_sessions", "websocket_bytes"):
            by_label: dict[str, int] = getattr(self, name)
            for label, count in traffic[name].items():
                by_label[label] = by_label.get(label, 0) + count
        for name in ("upstream_latency", "upstream_ttfb"):
            for label, (counts, total) in traffic[name].items():
                histogram = _histogram(getattr(self, name), label)
                histogram.counts = [mine + theirs for mine, theirs in zip(histogram.counts, counts, strict=True)]
                histogram.total += total
        streams, bytes_in, bytes_out, websockets = traffic["gauges"]
        self.active_streams += streams
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.websockets_open += websockets

    def share_token_figures(self, source: Metrics) -> None:
        """Report `source`'s identity-provider calls and token expiry as this one's (the pod's, from the parent)."""
        self.token_acquisitions = source.token_acquisitions
        self.idp_latency = source.idp_latency
        self._expiry = source.seconds_until_expiry


def _histogram(by_label: dict[str, Histogram], label: str) -> Histogram:
    histogram = by_label.get(label)
    if histogram is None:
        histogram = by_label[label] = Histogram()
    return histogram


class _Collector:
    """Turns the plain numbers into Prometheus families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _counters(
            "sidecar_requests",
            "Requests answered, by method, status code (standard codes; anything else: other) and route family",
            ["method", "code", "route"],
            [((method, _code(code), route), count) for (method, code, route), count in m.requests.items()],
        )
        yield _counters(
            "sidecar_backend_responses",
            "Upstream answers, by configured route prefix, backend and status code",
            ["prefix", "backend", "code"],
            [((prefix, name, _code(code)), count) for (prefix, name, code), count in m.backend_responses.items()],
        )
        yield _counters(
            "sidecar_backend_cooldowns",
            "Times a backend was set aside after a 429/503 or a failed connection, by route prefix and backend",
            ["prefix", "backend"],
            m.cooldowns.items(),
        )
        yield _histograms(
            "sidecar_upstream_duration_seconds",
            "Time from sending upstream to the end of the response",
            "route",
            m.upstream_latency,
        )
        yield _histograms(
            "sidecar_upstream_ttfb_seconds",
            "Time from sending upstream to the response headers",
            "route",
            m.upstream_ttfb,
        )
        yield GaugeMetricFamily("sidecar_active_streams", "Responses being streamed now", value=m.active_streams)
        yield CounterMetricFamily("sidecar_request_bytes", "Request body bytes sent upstream", value=m.bytes_in)
        yield CounterMetricFamily("sidecar_response_bytes", "Response body bytes sent to callers", value=m.bytes_out)
        yield GaugeMetricFamily(
            "sidecar_websocket_sessions_open", "WebSocket sessions being relayed now", value=m.websockets_open
        )
        yield _counters(
            "sidecar_websocket_sessions",
            "WebSocket sessions relayed and ended, by what ended them (caller, upstream, shutdown, error)",
            ["ended_by"],
            (((ended_by,), count) for ended_by, count in m.websocket_sessions.items()),
        )
        yield _counters(
            "sidecar_websocket_frames",
            "WebSocket data frames relayed, by direction and type (a message sent in fragments counts once)",
            ["direction", "type"],
            m.websocket_frames.items(),
        )
        yield _counters(
            "sidecar_websocket_bytes",
            "WebSocket payload bytes relayed, by direction",
            ["direction"],
            (((direction,), size) for direction, size in m.websocket_bytes.items()),
        )
        yield _counters(
            "sidecar_token_acquisitions",
            "Token requests to the identity provider, by flow and outcome",
            ["flow", "outcome"],
            m.token_acquisitions.items(),
        )
        yield _histograms(
            "sidecar_identity_provider_duration_seconds",
            "Time the identity provider took to answer",
            "flow",
            m.idp_latency,
        )
        build = GaugeMetricFamily("sidecar_build_info", "The running sidecar's version", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily(
            "sidecar_token_expires_in_seconds",
            "Seconds until the current token expires (-1 if none)",
            value=m.seconds_until_expiry(),
        )


def _code(code: int) -> str:
    return str(code) if code else "other"


def _counters(
    name: str, documentation: str, labels: list[str], counts: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in counts:
        family.add_metric(list(values), count)
    return family


def _histograms(name: str, documentation: str, label: str, by_label: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in by_label.items():
        family.add_metric([value], histogram.buckets(), histogram.total)
    return family
