"""/metrics (sidecar/metrics.py): the Prometheus exposition after real requests, parsed as Prometheus parses it,
with label sets that stay bounded whatever callers send."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from harness import BODY, CHAT, STREAM_BODY, StartSidecar, config_for, until
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar import __version__
from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack

EMBEDDINGS = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-06-01"
MODELS = "/openai/models?api-version=2024-06-01"
TRANSCRIPTIONS = "/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01"


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list[Sample]]:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict[str, list[Sample]], sample: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    found = [s.value for s in families.get(family, []) if s.name == sample and s.labels == labels]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


def histogram(families: dict[str, list[Sample]], family: str, **labels: str) -> tuple[float, float, list[float]]:
    """(count, sum, the cumulative bucket counts in order of their bounds) of one histogram series."""
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in families[family]
        if s.name == family + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
    ]
    counts = [count for _, count in sorted(buckets)]
    return value(families, family + "_count", **labels), value(families, family + "_sum", **labels), counts


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
                # methods beyond the standard set (WebDAV ones the parser knows): one "other" label
                async with http.request(("PROPFIND", "MKCOL", "LOCK")[i % 3], sidecar.url + "/healthz") as response:
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
        "sidecar_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_objects_collected",
    ):
        assert name in families, name
    series = sum(len(samples) for samples in families.values())
    assert series < 200, f"{series} series after 1,000 distinct paths"
    labels = {json.dumps(sample.labels, sort_keys=True) for samples in families.values() for sample in samples}
    assert not any("dep-" in label or "agent-" in label or "/unknown" in label for label in labels)
    requests = {(s.labels["route"], s.labels["method"], s.labels["code"]): s.value
                for s in families["sidecar_requests"] if s.name == "sidecar_requests_total"}  # fmt: skip
    assert requests[("chat.completions", "POST", "200")] == 1
    assert sum(v for (route, _, _), v in requests.items() if route == "chat.completions") == 1001
    assert requests[("not_found", "GET", "404")] == 10
    assert requests.get(("sidecar", "other", "404")) == 10, requests
    (build,) = families["sidecar_build_info"]
    assert build.labels == {"version": __version__} and build.value == 1
    (rss,) = families["process_resident_memory_bytes"]
    assert 10e6 < rss.value < 500e6
    acquisitions = [s for s in families["sidecar_token_acquisitions"] if s.name.endswith("_total")]
    assert [(s.labels["flow"], s.labels["outcome"], s.value) for s in acquisitions] == [
        ("client_credentials", "success", 1.0)
    ]
    (expiry,) = families["sidecar_token_expires_in_seconds"]
    assert 3000 < expiry.value <= 3600


async def test_counters_and_histograms_count_what_was_sent(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted(status=500, body=b'{"error": "boom"}', match="/models"))
    embedding_body = json.dumps({"input": "x", "model": "text-embedding-3-small"}).encode()
    received = 0
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        for path, body in ((CHAT, BODY), (CHAT, BODY), (CHAT, STREAM_BODY), (EMBEDDINGS, embedding_body)):
            async with http.post(sidecar.url + path, data=body) as response:
                assert response.status == 200
                received += len(await response.read())
        async with http.get(sidecar.url + MODELS) as response:
            assert response.status == 500
            received += len(await response.read())
        async with http.get(sidecar.url + "/nowhere") as response:
            assert response.status == 404  # answered by the sidecar: counted, but no upstream time
        families = await scrape(http, sidecar.url)

    def requests(method: str, code: str, route: str) -> float:
        return value(families, "sidecar_requests_total", method=method, code=code, route=route)

    assert requests("POST", "200", "chat.completions") == 3
    assert requests("POST", "200", "embeddings") == 1
    assert requests("GET", "500", "models") == 1
    assert requests("GET", "404", "not_found") == 1
    sent = 2 * len(BODY) + len(STREAM_BODY) + len(embedding_body)
    assert value(families, "sidecar_request_bytes_total") == sent
    assert value(families, "sidecar_response_bytes_total") == received
    for family in ("sidecar_upstream_duration_seconds", "sidecar_upstream_ttfb_seconds"):
        for route, forwarded in (("chat.completions", 3), ("embeddings", 1), ("models", 1)):
            count, total, buckets = histogram(families, family, route=route)
            assert count == forwarded and buckets[-1] == forwarded, (family, route)
            assert buckets == sorted(buckets) and total > 0
        assert {s.labels["route"] for s in families[family]} == {"chat.completions", "embeddings", "models"}
    assert value(families, "sidecar_active_streams") == 0
    # one token, fetched at start; the identity provider's time is observed once
    acquisitions = [s for s in families["sidecar_token_acquisitions"] if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in acquisitions] == [({"flow": "client_credentials", "outcome": "success"}, 1)]
    count, total, _ = histogram(families, "sidecar_identity_provider_duration_seconds", flow="client_credentials")
    assert count == 1 and total > 0
    assert 3000 < value(families, "sidecar_token_expires_in_seconds") <= 3600


async def test_a_stream_is_active_until_it_ends_and_a_caller_who_leaves_is_a_499(
    stack: Stack, sidecar: RunningSidecar
) -> None:
    stack.upstream.stream_delay = 0.5
    stack.upstream.stream_chunks = 40  # 20 s, unless the caller leaves
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as streamer:
        response = await streamer.post(sidecar.url + CHAT, data=STREAM_BODY)
        assert (await response.content.readany()).startswith(b"data: ")
        assert value(await scrape(http, sidecar.url), "sidecar_active_streams") == 1
        response.close()  # the caller leaves mid-stream

        async def ended() -> bool:
            return value(await scrape(http, sidecar.url), "sidecar_active_streams") == 0

        await until(ended, what="the stream to end", every=0.05)
        families = await scrape(http, sidecar.url)
    labels = {"method": "POST", "route": "chat.completions"}
    assert value(families, "sidecar_requests_total", code="499", **labels) == 1  # the caller went away mid-stream
    assert value(families, "sidecar_requests_total", code="200", **labels) == 0
    count, _, _ = histogram(families, "sidecar_upstream_duration_seconds", route="chat.completions")
    assert count == 1
    assert value(families, "sidecar_response_bytes_total") > 0  # what reached the caller before it left


async def test_identity_provider_failures_and_no_token(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.fail_mode = "refuse"  # connections dropped (msal would hold back a retry after a 5xx for 5 s)
    running = await run_sidecar(config_for(stack))
    async with aiohttp.ClientSession() as http:

        async def failure_counted() -> bool:
            families = await scrape(http, running.url)
            labels = {"flow": "client_credentials", "outcome": "failure"}
            return value(families, "sidecar_token_acquisitions_total", **labels) >= 1

        await until(failure_counted, what="a failed token request in the metrics", every=0.05)
        families = await scrape(http, running.url)
        assert value(families, "sidecar_token_expires_in_seconds") == -1  # no token held
        stack.entra.fail_mode = None

        async def success_counted() -> bool:
            families = await scrape(http, running.url)
            labels = {"flow": "client_credentials", "outcome": "success"}
            return value(families, "sidecar_token_acquisitions_total", **labels) == 1

        await until(success_counted, what="the token, once the identity provider answers", every=0.05)
        families = await scrape(http, running.url)
    assert 3000 < value(families, "sidecar_token_expires_in_seconds") <= 3600
    failures = value(families, "sidecar_token_acquisitions_total", flow="client_credentials", outcome="failure")
    count, _, _ = histogram(families, "sidecar_identity_provider_duration_seconds", flow="client_credentials")
    assert count == failures + 1  # every answer's time, failed or not


async def test_a_chunked_upload_counts_its_bytes(stack: Stack, sidecar: RunningSidecar) -> None:
    audio = bytes(range(256)) * 4096  # 1 MiB

    async def chunks() -> Any:  # no Content-Length: the sidecar streams it upstream
        for start in range(0, len(audio), 1 << 16):
            yield audio[start : start + (1 << 16)]

    async with aiohttp.ClientSession() as http:
        async with http.post(sidecar.url + TRANSCRIPTIONS, data=chunks()) as response:
            await response.read()
        families = await scrape(http, sidecar.url)
    assert stack.upstream.requests[-1].body_size == len(audio)
    assert value(families, "sidecar_request_bytes_total") == len(audio)
