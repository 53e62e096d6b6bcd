"""/metrics (sidecar/metrics.py): the Prometheus exposition after real requests, parsed as Prometheus parses it,
with label sets that stay bounded whatever callers send."""

from __future__ import annotations

import json

import aiohttp
from harness import CHAT, STREAM_BODY
from prometheus_client.parser import text_string_to_metric_families

from sidecar.server import RunningSidecar
from sidecar_emulators import Stack


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list]:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def test_metrics_families_with_bounded_labels(stack: Stack, sidecar: RunningSidecar) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar.url + CHAT, data=STREAM_BODY) as response:
            await response.read()
        for i in range(1000):  # distinct paths, deployment names, user agents: none may become a label
            path = f"/openai/deployments/dep-{i}/chat/completions?api-version=2024-06-01&n={i}"
            async with http.get(sidecar.url + path, headers={"User-Agent": f"agent-{i}"}) as response:
                await response.read()
            if i % 100 == 0:
                async with http.get(sidecar.url + f"/unknown/{i}") as response:
                    await response.read()
        families = await scrape(http, sidecar.url)
    for name in (
        "sidecar_requests",
        "sidecar_upstream_duration_seconds",
        "sidecar_upstream_ttfb_seconds",
        "sidecar_active_streams",
        "sidecar_request_bytes",
        "sidecar_response_bytes",
        "sidecar_token_acquisitions",
        "sidecar_identity_provider_duration_seconds",
        "sidecar_token_expires_in_seconds",
    ):
        assert name in families, name
    series = sum(len(samples) for samples in families.values())
    assert series < 200, f"{series} series after 1,000 distinct paths"
    labels = {json.dumps(sample.labels, sort_keys=True) for samples in families.values() for sample in samples}
    assert not any("dep-" in label or "agent-" in label or "/unknown" in label for label in labels)
    requests = {(s.labels["route"], s.labels["status_class"]): s.value for s in families["sidecar_requests"]
                if s.name == "sidecar_requests_total"}  # fmt: skip
    assert requests[("chat.completions", "2xx")] >= 1
    assert sum(v for (route, _), v in requests.items() if route == "chat.completions") == 1001
    assert requests[("not_found", "4xx")] == 10
    acquisitions = [s for s in families["sidecar_token_acquisitions"] if s.name.endswith("_total")]
    assert [(s.labels["flow"], s.labels["outcome"], s.value) for s in acquisitions] == [
        ("client_credentials", "success", 1.0)
    ]
    (expiry,) = families["sidecar_token_expires_in_seconds"]
    assert 3000 < expiry.value <= 3600
