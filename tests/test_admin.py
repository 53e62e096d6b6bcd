"""The admin listener (admin.port): health, readiness and metrics for probes and scrapers, never the proxy."""

from __future__ import annotations

import asyncio

import aiohttp
from harness import StartSidecar, config_for, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from sidecar.server import ADMIN_MAX_CONNECTIONS
from sidecar_emulators import Scripted, Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"


async def test_admin_port_serves_health_readiness_metrics_and_refuses_the_proxy(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    running = await run_sidecar(config_for(stack, admin={"host": "127.0.0.1", "port": 0}))
    await wait_ready(running)
    assert running.admin_url is not None and running.admin_url != running.url
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + CHAT, json={"messages": []}) as response:
            assert response.status == 200
        for path in ("/healthz", "/readyz"):
            for base in (running.admin_url, running.url):  # the main listener keeps its probes
                async with http.get(base + path) as response:
                    assert response.status == 200, (base, path)
        async with http.get(running.admin_url + "/metrics") as response:
            assert response.status == 200
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        (sample,) = [s for s in families["sidecar_requests"].samples if s.labels.get("route") == "chat.completions"]
        assert sample.value == 1
        # the proxy is not on the admin port, whatever the method or target; /metrics moved off the main port
        before = len(stack.upstream.requests)
        for method, path in (("POST", CHAT), ("GET", "/openai/models"), ("GET", "/")):
            async with http.request(method, running.admin_url + path) as response:
                assert response.status == 404, (method, path)
        assert len(stack.upstream.requests) == before
        async with http.get(running.url + "/metrics") as response:
            assert response.status == 404


async def test_without_an_admin_port_metrics_stay_on_the_main_listener(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack))
    assert running.admin_url is None
    async with aiohttp.ClientSession() as http, http.get(running.url + "/metrics") as response:
        assert response.status == 200


async def test_upstream_429s_are_counted_under_their_own_code(stack: Stack, run_sidecar: StartSidecar) -> None:
    """429 is the signal that matters most with Azure OpenAI: it has its own `code`, not a 4xx class."""
    running = await run_sidecar(config_for(stack, admin={"port": 0}))
    await wait_ready(running)
    stack.upstream.script(*(Scripted.rate_limited(1) for _ in range(3)))
    async with aiohttp.ClientSession() as http:
        for expected in (429, 429, 429, 200):
            async with http.post(running.url + CHAT, json={"messages": []}) as response:
                assert response.status == expected
        async with http.get(running.admin_url + "/metrics") as response:
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    counted = {
        sample.labels["code"]: sample.value
        for sample in families["sidecar_requests"].samples
        if sample.labels.get("route") == "chat.completions" and sample.name == "sidecar_requests_total"
    }
    assert counted == {"429": 3, "200": 1}


async def test_a_connection_flood_on_the_admin_port_is_bounded_and_cut(stack: Stack, run_sidecar: StartSidecar) -> None:
    """The admin port listens on the pod IP: whoever reaches it must not hold the process's memory and
    descriptors (those its token requests need) with idle connections, nor stop the proxy."""
    running = await run_sidecar(config_for(stack, admin={"port": 0}, listen={"header_timeout": 1.0}))
    await wait_ready(running)
    assert running.admin_url is not None
    host, port = running.admin_url.removeprefix("http://").rsplit(":", 1)
    held = [await asyncio.open_connection(host, int(port)) for _ in range(ADMIN_MAX_CONNECTIONS)]
    try:
        extra_reader, extra_writer = await asyncio.open_connection(host, int(port))
        assert await asyncio.wait_for(extra_reader.read(), 5) == b""  # past the cap: closed at once
        extra_writer.close()
        async with aiohttp.ClientSession() as http:
            async with http.post(running.url + CHAT, json={"messages": []}) as response:
                assert response.status == 200  # the proxy does not notice
            # silent connections are cut at listen.header_timeout: the probes get through again
            for reader, _ in held:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            async with http.get(running.admin_url + "/healthz") as response:
                assert response.status == 200
    finally:
        for _, writer in held:
            writer.close()
