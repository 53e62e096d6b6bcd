"""Prometheus metrics, one registry per app (no global state), with bounded label sets only."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests answered, by method, status class and route family",
            ["method", "status_class", "route"], registry=r,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_duration_seconds", "Time from sending upstream to the end of the response",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_ttfb = Histogram(
            "sidecar_upstream_ttfb_seconds", "Time from sending upstream to the response headers",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.active_streams = Gauge("sidecar_active_streams", "Responses being streamed now", registry=r)
        self.bytes_in = Counter("sidecar_request_bytes", "Request body bytes sent upstream", registry=r)
        self.bytes_out = Counter("sidecar_response_bytes", "Response body bytes sent to callers", registry=r)
        self.token_acquisitions = Counter(
            "sidecar_token_acquisitions", "Token requests to the identity provider, by flow and outcome",
            ["flow", "outcome"], registry=r,
        )
        self.idp_latency = Histogram(
            "sidecar_identity_provider_duration_seconds", "Time the identity provider took to answer",
            ["flow"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.token_expiry = Gauge(
            "sidecar_token_expires_in_seconds", "Seconds until the current token expires (-1 if none)", registry=r
        )

    def observe_token(self, flow: str, outcome: str, seconds: float) -> None:
        self.token_acquisitions.labels(flow, outcome).inc()
        self.idp_latency.labels(flow).observe(seconds)

    def track_expiry(self, seconds_left: Callable[[], float | None]) -> None:
        self.token_expiry.set_function(lambda: _or_minus_one(seconds_left()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _or_minus_one(value: float | None) -> float:
    return -1.0 if value is None else value


def now() -> float:
    return time.monotonic()
