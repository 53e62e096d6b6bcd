"""Operating the sidecar: metrics, logs, graceful shutdown, secret rotation, static upstream headers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
from harness import _WATCH, StartSidecar, config_for, start_serve, stop_serve, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
STREAM_BODY = json.dumps({"stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


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


async def test_sigterm_drains_streams_and_exits_0(stack: Stack, tmp_path: Path) -> None:
    stack.upstream.stream_delay = 0.25
    stack.upstream.stream_chunks = 8  # ~2 s of streaming
    process, url = await start_serve(tmp_path, config_for(stack, logging={"format": "json"}))
    try:
        probe = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        streamer = aiohttp.ClientSession()
        async with probe, streamer:
            async with probe.get(url + "/healthz") as response:  # a kept-alive connection for later probes
                assert response.status == 200
            response = await streamer.post(url + CHAT, data=STREAM_BODY)
            first = await response.content.readany()
            assert first.startswith(b"data: ")
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with probe.get(url + "/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["status"] == "draining"
            rest = await response.read()
            assert (first + rest).rstrip().endswith(b"data: [DONE]")  # the stream completed
            # new connections are refused while draining
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(url + "/healthz") as late:
                    refused = False
                    assert late.status in (200, 503)
            except aiohttp.ClientConnectionError:
                refused = True
            assert refused
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        err = await stop_serve(process)
    lines = err.splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    access = [e for e in entries if e["logger"] == "sidecar.access"]
    assert access and access[0]["route"] == "chat.completions" and access[0]["status"] == 200
    assert access[0]["upstream_status"] == 200 and access[0]["bytes_out"] > 0
    text = "\n".join(lines)
    assert "eyJ" not in text and stack.client_secret not in text


async def test_sigterm_exits_promptly_while_the_identity_provider_hangs(stack: Stack, tmp_path: Path) -> None:
    # A token request stuck on a silent identity provider (msal waits up to 30 s for an answer) must not
    # hold the process past its grace period: Kubernetes would SIGKILL it mid-way.
    stack.entra.fail_mode = "hang"
    process, _ = await start_serve(tmp_path, config_for(stack, shutdown_grace=1), probe="/healthz")
    try:
        await asyncio.sleep(0.5)  # the first token request is out and parked by the emulator
        assert stack.entra.token_requests >= 1
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert time.monotonic() - stopped_at < 4.0
    finally:
        err = await stop_serve(process)
    assert "Traceback" not in err
    assert "stopped" in err


async def test_rotated_secret_file_is_used_without_restart(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(stack.client_secret + "\n")
    config = config_for(stack)
    del config["auth"]["client_secret"]
    config["auth"]["client_secret_file"] = str(secret_file)
    running = await run_sidecar(config)
    await wait_ready(running)
    assert stack.entra.last_token_request_form["client_secret"] == stack.client_secret

    rotated = "rotated-secret-value-2"
    _WATCH.secrets.add(rotated)
    stack.entra.set_client_secret(stack.client_id, rotated)
    secret_file.write_text(rotated + "\n")
    stack.upstream.script(Scripted.unauthorized())
    async with aiohttp.ClientSession() as http, http.get(running.url + "/openai/models?api-version=1") as response:
        assert response.status == 200  # the 401 made the sidecar fetch a new token: with the new secret
    assert stack.entra.last_token_request_form["client_secret"] == rotated
    assert stack.entra.token_requests == 2


async def test_static_upstream_headers_from_env_and_file(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    key_file = tmp_path / "function-key"
    key_file.write_text("function-key-from-file\n")
    running = await run_sidecar(
        config_for(
            stack,
            upstream={
                "headers": {"x-functions-key": "inline-function-key"},
                "headers_files": {"x-extra-key": str(key_file)},
            },
        )
    )
    await wait_ready(running)
    async with aiohttp.ClientSession() as http, http.get(running.url + "/openai/models?api-version=1") as response:
        assert response.status == 200
    (seen,) = stack.upstream.requests
    assert seen.headers["x-functions-key"] == "inline-function-key"
    assert seen.headers["x-extra-key"] == "function-key-from-file"
    _WATCH.secrets.update({"inline-function-key", "function-key-from-file"})
