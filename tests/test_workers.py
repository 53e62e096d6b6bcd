"""`workers: N`: several processes on one port, one identity-provider call per token, and a clean drain."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from harness import BODY, CHAT, STREAM_BODY, write_config
from processes import accepted_by, post_raw, start_workers, stop, worker_pids

from sidecar.claims import unverified_claims
from sidecar.config import ConfigError, Settings, load_config
from sidecar_emulators import Stack


async def test_workers_share_one_token_and_each_serves(stack: Stack, tmp_path: Path) -> None:
    stack.entra.fail_mode = "hang"  # the burst below arrives before any token exists
    process, url = await start_workers(stack, tmp_path, workers=2)
    port = int(url.rsplit(":", 1)[1])
    pids = worker_pids(process.pid)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        assert len(pids) == 2
        async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as ready:
            assert ready.status == 503  # truthful: no worker holds a token yet
        owners = set()
        for _ in range(64):  # the kernel spreads connections over the workers (SO_REUSEPORT)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connections.append((reader, writer))
            owners.add(await accepted_by(port, writer.get_extra_info("sockname")[1], pids))
            if len(connections) >= 16 and owners == set(pids):
                break
        assert owners == set(pids), f"connections landed on {owners}, workers are {pids}"
        burst = [asyncio.create_task(post_raw(r, w, port)) for r, w in connections]
        # every worker waits for the one token: none answers meanwhile (a negative check: a slow machine can only
        # make it miss an early answer, never fail it)
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in burst)
        stack.entra.fail_mode = None
        answers = await asyncio.gather(*burst)
        assert all(status == 200 and b"hello from upstream" in body for status, body in answers)
        assert stack.entra.token_requests == 1  # one identity-provider call for every worker
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/readyz") as ready:
                assert ready.status == 200
            async with http.get(url + "/metrics") as metrics:  # the parent's token counter, in a worker
                assert 'sidecar_token_acquisitions_total{flow="client_credentials",outcome="success"} 1.0' in (
                    await metrics.text()
                )
    finally:
        stack.entra.fail_mode = None  # a parked token request would hold the parent's exit
        for _, writer in connections:
            writer.close()
        code, lines = await stop(process)
    assert code == 0
    assert "eyJ" not in "\n".join(lines) and stack.client_secret not in "\n".join(lines)


async def test_workers_drain_streams_on_sigterm(stack: Stack, tmp_path: Path) -> None:
    stack.upstream.stream_delay = 0.25
    stack.upstream.stream_chunks = 8  # ~2 s of streaming
    process, url = await start_workers(stack, tmp_path, workers=2)
    try:
        async with aiohttp.ClientSession() as streamer:
            response = await streamer.post(url + CHAT, data=STREAM_BODY)
            first = await response.content.readany()
            assert first.startswith(b"data: ")
            process.send_signal(signal.SIGTERM)
            rest = await response.read()
            assert (first + rest).rstrip().endswith(b"data: [DONE]")  # the stream completed
        code = await asyncio.wait_for(process.wait(), 15)
        with pytest.raises(OSError):  # the port is closed with the sidecar
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1).close()
    finally:
        code, lines = await stop(process)
    assert code == 0
    entries = [json.loads(line) for line in lines if line.strip()]
    access = [e for e in entries if e["logger"] == "sidecar.access"]
    assert access and access[0]["status"] == 200 and access[0]["bytes_out"] > 0
    assert sum("draining" in e["message"] for e in entries) == 2  # each worker drained


async def test_workers_rotate_tokens_with_one_call_per_token(stack: Stack, tmp_path: Path) -> None:
    stack.entra.token_lifetime = 6  # renewed at half-life: a new token every ~3 s
    process, url = await start_workers(stack, tmp_path, workers=2, auth={"refresh_margin": 4})
    statuses: list[int] = []

    def tokens() -> set[str]:
        return {r.headers["Authorization"] for r in stack.upstream.requests}

    def rotated() -> bool:
        # three tokens carried requests and the identity provider was asked once for each, for both workers: a
        # call that gave no token the upstream saw would keep the counts apart for good (see test_proxy_sdk)
        return len(tokens()) >= 3 and stack.entra.token_requests == len(tokens())

    try:
        deadline = time.monotonic() + 90  # ~7 s when all is well
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            while not rotated():  # new connections: requests spread over both workers
                assert time.monotonic() < deadline, f"{stack.entra.token_requests} token requests, {len(tokens())} used"
                async with http.post(url + CHAT, data=BODY) as response:
                    statuses.append(response.status)
                await asyncio.sleep(0.05)
    finally:
        code, _ = await stop(process)
    assert code == 0
    assert set(statuses) == {200} and len(statuses) >= 5 * len(tokens())
    seen = stack.upstream.requests
    assert all(r.claims is not None for r in seen)  # the upstream checks exp: no expired token reached it
    assert all(unverified_claims(t.split()[1])["aud"] == stack.audience for t in tokens())


def test_workers_config(tmp_path: Path) -> None:
    def load(flow: str, **extra: object) -> Settings:
        auth = {"flow": flow, "scope": "api://x/.default", "tenant_id": "t", "client_id": "c", "client_secret": "s"}
        config = {"upstream": {"url": "https://func.example.net/api"}, "auth": auth, **extra}
        return load_config(write_config(tmp_path / "sidecar.yaml", config))

    assert load("client_credentials").workers == 1
    assert load("client_credentials", workers="auto").worker_count() >= 1
    assert load("client_credentials", workers=3).worker_count() == 3
    for wrong in (0, 65, "many"):
        with pytest.raises(ConfigError) as caught:
            load("client_credentials", workers=wrong)
        assert caught.value.problems[0].startswith("workers: must be a number of processes")
    with pytest.raises(ConfigError) as caught:
        load("on_behalf_of", workers=2)
    assert caught.value.problems == [
        "workers: on_behalf_of gets a token per caller, which workers cannot share: use workers: 1"
    ]
