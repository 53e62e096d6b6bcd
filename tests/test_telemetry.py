"""OpenTelemetry traces (sidecar/telemetry.py): what a collector receives over OTLP/HTTP, the traceparent the
upstream sees, nothing secret in any span, nothing of OpenTelemetry loaded with tracing off, and the config keys
with the standard OTEL_* variables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness import FAST_RETRY, JWT, config_for, free_port, wait_ready, write_config
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from processes import start_workers, stop
from yarl import URL

from sidecar.config import ConfigError, Settings, load_config
from sidecar.server import start
from sidecar_emulators import Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01&marker=query-7f3a"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
SERVER, CLIENT = 2, 3  # opentelemetry.proto Span.SpanKind


@pytest.fixture(autouse=True)
def _no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's OTEL_* variables must not turn tracing on (or off) under a test."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int
    start_ns: int
    end_ns: int


@dataclass
class Collector:
    """An OTLP/HTTP receiver on loopback: the raw body of every POST /v1/traces, and its spans decoded."""

    bodies: list[bytes] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def _receive(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.bodies.append(await request.read())
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def spans(self) -> list[Span]:
        found = []
        for body in self.bodies:
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            for resource_spans in export.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            Span(
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                attributes=_attributes(span.attributes),
                                resource=resource,
                                status=span.status.code,
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                            )
                        )
        return found

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def collector() -> Any:
    receiver = Collector()
    await receiver.start()
    yield receiver
    await receiver.aclose()


def _traceparent(value: str) -> tuple[str, str]:
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00" and int(flags, 16) & 1, value  # sampled (0x02, "random", may be set too)
    return trace_id, parent_id


async def test_spans_continue_the_callers_trace_and_the_upstream_gets_ours(stack: Stack, collector: Collector) -> None:
    config = config_for(stack, telemetry={"otlp_endpoint": collector.url, "service_name": "sidecar-under-test"})
    sidecar = await start(Settings(**config), retry=FAST_RETRY)
    try:
        await wait_ready(sidecar)
        async with aiohttp.ClientSession() as http:
            continued = {
                "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01",
                "tracestate": "vendor=caller-state",
                "x-ms-client-request-id": "caller-id-5d1e",
            }
            async with http.post(sidecar.url + CHAT, data=BODY, headers=continued) as response:
                assert response.status == 200
                await response.read()
            async with http.post(sidecar.url + CHAT, data=BODY) as response:  # no traceparent: a new trace
                assert response.status == 200
                await response.read()
            async with http.get(sidecar.url + "/healthz") as response:  # probes make no spans
                assert response.status == 200
    finally:
        await sidecar.aclose()  # flushes what the batch processor holds

    seen = [request for request in stack.upstream.requests if "chat/completions" in request.path_qs]
    assert len(seen) == 2
    spans = collector.spans()
    servers = [span for span in spans if span.kind == SERVER]
    clients = [span for span in spans if span.kind == CLIENT]
    fetches = [span for span in spans if span.name == "token fetch"]
    assert len(servers) == 2 and len(clients) == 2, [(span.name, span.kind) for span in spans]
    assert {span.resource["service.name"] for span in spans} == {"sidecar-under-test"}

    # the caller's trace, continued: server span under the caller's span, client span under the server span,
    # and the upstream saw the client span as its parent (not the caller's span)
    server, client = servers[0], clients[0]
    assert (server.trace_id, server.parent_id) == (TRACE_ID, CALLER_SPAN_ID)
    assert (client.trace_id, client.parent_id) == (TRACE_ID, server.span_id)
    assert _traceparent(seen[0].headers["traceparent"]) == (TRACE_ID, client.span_id)
    assert seen[0].headers.getall("traceparent") == [seen[0].headers["traceparent"]]  # replaced, not added
    assert seen[0].headers["tracestate"] == "vendor=caller-state"  # carried on with the trace
    # a trace the sidecar starts: the server span is its root
    server, client = servers[1], clients[1]
    assert server.parent_id == "" and server.trace_id != TRACE_ID
    assert (client.trace_id, client.parent_id) == (server.trace_id, server.span_id)
    assert _traceparent(seen[1].headers["traceparent"]) == (server.trace_id, client.span_id)

    for server in servers:
        assert server.name == "POST chat.completions"
        assert server.attributes == {
            "http.request.method": "POST",
            "sidecar.route": "chat.completions",
            "url.scheme": "http",
            "http.response.status_code": 200,
        }
        assert server.start_ns <= server.end_ns
    upstream = URL(stack.upstream_url)
    for client in clients:
        assert client.attributes == {
            "http.request.method": "POST",
            "sidecar.route": "chat.completions",
            "server.address": upstream.host,
            "server.port": upstream.port,
            "url.scheme": upstream.scheme,
            "http.response.status_code": 200,
        }
        server = next(span for span in servers if span.span_id == client.parent_id)
        assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns

    assert fetches, "the identity-provider call has its span"
    for fetch in fetches:
        assert fetch.attributes == {"sidecar.token.flow": "client_credentials", "sidecar.token.outcome": "success"}
        assert 0 < fetch.end_ns - fetch.start_ns < 60 * 10**9

    # nothing secret or caller-controlled in anything exported: not the token the upstream saw, not the client
    # secret, not the query string, not a header value
    token = seen[0].headers["Authorization"].removeprefix("Bearer ")
    assert JWT.fullmatch(token)
    exported = b"".join(collector.bodies)
    for value in (token, stack.client_secret, "query-7f3a", "api-version", "caller-id-5d1e", "gpt-4o-mini"):
        assert value.encode() not in exported, value
    assert not JWT.search(exported.decode("utf-8", "replace"))


async def test_an_unreachable_upstream_marks_both_spans_as_errors(stack: Stack, collector: Collector) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    config = config_for(
        stack, upstream={"url": nobody, "connect_timeout": 2}, telemetry={"otlp_endpoint": collector.url}
    )
    sidecar = await start(Settings(**config), retry=FAST_RETRY)
    try:
        await wait_ready(sidecar)
        async with aiohttp.ClientSession() as http, http.post(sidecar.url + CHAT, data=BODY) as response:
            assert response.status == 502
    finally:
        await sidecar.aclose()
    spans = collector.spans()
    (server,) = [span for span in spans if span.kind == SERVER]
    (client,) = [span for span in spans if span.kind == CLIENT]
    assert client.parent_id == server.span_id
    assert client.status == server.status == 2  # STATUS_CODE_ERROR
    assert client.attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in client.attributes
    assert (server.attributes["http.response.status_code"], server.attributes["error.type"]) == (502, "502")


async def test_with_workers_the_parent_traces_each_token_fetch_once(
    stack: Stack, collector: Collector, tmp_path: Path
) -> None:
    """The parent makes the identity-provider calls, so it traces them; the workers, which only hear of them,
    must not add a span each."""
    process, url = await start_workers(stack, tmp_path, workers=2, telemetry={"otlp_endpoint": collector.url})
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(6):  # new connections: both workers serve some
                async with http.post(url + CHAT, data=BODY) as response:
                    assert response.status == 200
                    await response.read()
    finally:
        code, _ = await stop(process)  # every process flushes its spans as it exits
    assert code == 0
    spans = collector.spans()
    fetches = [span for span in spans if span.name == "token fetch"]
    assert stack.entra.token_requests == 1
    assert len(fetches) == 1, [(span.name, span.resource.get("process.pid")) for span in spans]
    assert fetches[0].attributes == {"sidecar.token.flow": "client_credentials", "sidecar.token.outcome": "success"}
    servers = [span for span in spans if span.kind == SERVER]
    clients = [span for span in spans if span.kind == CLIENT]
    assert len(servers) == len(clients) == 6
    assert {client.parent_id for client in clients} == {server.span_id for server in servers}


PROBE = """
import asyncio, json, sys
import aiohttp
from sidecar.config import load_config
from sidecar.server import start

async def main() -> None:
    running = await start(load_config(sys.argv[1]))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(running.url + sys.argv[2], data=b'{"messages": []}') as response:
                status = response.status
                await response.read()
    finally:
        await running.aclose()
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] == "opentelemetry")
    print(json.dumps({"status": status, "loaded": loaded}))

asyncio.run(main())
"""


@pytest.mark.parametrize("tracing", [False, True])
async def test_with_tracing_off_no_opentelemetry_module_is_loaded(
    stack: Stack, collector: Collector, tmp_path: Path, tracing: bool
) -> None:
    """A process that builds and starts the app and proxies a request, with tracing off, has not one
    opentelemetry module loaded; with it on (the control) it has."""
    config = config_for(stack, telemetry={"otlp_endpoint": collector.url} if tracing else {})
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OTEL_", "SIDECAR_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, write_config(tmp_path / "sidecar.yaml", config), CHAT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["status"] == 200
    if tracing:
        assert "opentelemetry.sdk.trace" in result["loaded"]
        assert collector.bodies, "the control's spans reached the collector"
    else:
        assert result["loaded"] == []


GOOD = {"upstream": {"url": "https://func.example.net"}, "auth": {"flow": "azure_cli", "scope": "api://x/.default"}}


def test_telemetry_is_off_unless_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(**GOOD).telemetry.otlp_endpoint is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    assert Settings(**GOOD).telemetry.otlp_endpoint is None


def test_the_standard_otel_variables_are_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.monitoring:4318/")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-sidecar")
    telemetry = Settings(**GOOD).telemetry
    assert (telemetry.otlp_endpoint, telemetry.service_name) == ("http://collector.monitoring:4318", "billing-sidecar")
    # the config file's keys win over them; `otlp_endpoint: null` (as in the example) is not set: the variable holds
    path = write_config(
        tmp_path / "sidecar.yaml",
        {**GOOD, "telemetry": {"otlp_endpoint": "https://otel.example.net:4318", "service_name": "s"}},
    )
    telemetry = load_config(path).telemetry
    assert (telemetry.otlp_endpoint, telemetry.service_name) == ("https://otel.example.net:4318", "s")
    unset = write_config(tmp_path / "unset.yaml", {**GOOD, "telemetry": {"otlp_endpoint": None, "service_name": None}})
    assert load_config(unset).telemetry.otlp_endpoint == "http://collector.monitoring:4318"
    # an empty value turns it off, whatever the variable says
    monkeypatch.setenv("SIDECAR_TELEMETRY__OTLP_ENDPOINT", "")
    assert load_config(path).telemetry.otlp_endpoint is None
    monkeypatch.delenv("SIDECAR_TELEMETRY__OTLP_ENDPOINT")
    # SIDECAR_TELEMETRY__* win over the file, as for every key
    monkeypatch.setenv("SIDECAR_TELEMETRY__SAMPLE_RATIO", "0.25")
    assert load_config(path).telemetry.sample_ratio == 0.25
    # OTEL_SDK_DISABLED=true is the standard off switch for the variable
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Settings(**GOOD).telemetry.otlp_endpoint is None


@pytest.mark.parametrize(
    ("env", "telemetry", "problem"),
    [
        ({}, {"otlp_endpoint": "collector:4318"}, "telemetry.otlp_endpoint: must be the collector's http(s) base URL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"}, {}, "telemetry.otlp_endpoint: must be the collector's"),
        ({}, {"otlp_endpoint": "http://c:4318?key=1"}, "telemetry.otlp_endpoint: must be the collector's"),
        ({}, {"otlp_endpoint": "https://u:p@c:4318"}, "telemetry.otlp_endpoint: must not carry credentials"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            {"otlp_endpoint": "http://c:4317"},
            "telemetry.otlp_endpoint: OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported",
        ),
        ({}, {"sample_ratio": 2}, "telemetry.sample_ratio: Input should be less than or equal to 1"),
    ],
)
def test_telemetry_config_mistakes_name_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], telemetry: dict[str, Any], problem: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path / "sidecar.yaml", {**GOOD, "telemetry": telemetry}))
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_an_endpoint_without_the_otel_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)  # what find_spec reports for an absent package
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    with pytest.raises(ConfigError) as caught:
        load_config(None)
    assert "pip install 'entra-token-sidecar[otel]'" in str(caught.value)
