"""Running the sidecar (sidecar/server.py): graceful shutdown on SIGTERM, and the warning when it listens beyond
loopback without inbound keys."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from harness import CHAT, STREAM_BODY, StartSidecar, config_for, start_serve, stop_serve, until

from sidecar.config import Settings
from sidecar.server import warn_if_exposed
from sidecar_emulators import Stack


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

            async def draining() -> bool:  # on the kept-alive connection: the listener is closed by then
                async with probe.get(url + "/readyz") as ready:
                    return ready.status == 503 and (await ready.json())["status"] == "draining"

            await until(draining, what="/readyz to say draining", every=0.05)
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
        await until(lambda: stack.entra.token_requests >= 1, what="the first token request, parked")
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        # the grace period (1 s) and the clean-up, not msal's 30 s wait for an answer
        assert time.monotonic() - stopped_at < 10
    finally:
        err = await stop_serve(process)
    assert "Traceback" not in err
    assert "stopped" in err


async def test_non_loopback_without_api_keys_warns(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    exposed = Settings(**config_for(stack, listen={"host": "0.0.0.0"}))
    with caplog.at_level("WARNING", logger="sidecar"):
        warn_if_exposed(exposed)
    assert "without inbound.api_keys" in caplog.text
    caplog.clear()
    guarded = Settings(**config_for(stack, listen={"host": "0.0.0.0"}, inbound={"api_keys": ["k"]}))
    with caplog.at_level("WARNING", logger="sidecar"):
        warn_if_exposed(guarded)
        warn_if_exposed(Settings(**config_for(stack)))
        key_file = tmp_path / "keys"
        key_file.write_text("k\n")
        warn_if_exposed(Settings(**config_for(stack, listen={"host": "0.0.0.0"}, inbound={"api_keys_file": key_file})))
    assert caplog.text == ""
