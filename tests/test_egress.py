"""Behind a corporate egress proxy: the upstream and the identity provider are reached through it.

The emulators are advertised as `emu.test`, a name only the forward proxy (proxy.py, started here on
loopback) can resolve: a request that did not go through the proxy cannot reach them at all.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness import StartSidecar, free_port, wait_ready

from sidecar_emulators import Stack, start_stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"


@pytest.fixture
async def hidden_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with await start_stack(tmp_path / "emulators", public_host="emu.test") as started:
        yield started


@pytest.fixture
async def forward_proxy(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    port = free_port()
    log = tmp_path / "proxy.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port), "--threaded",
            "--num-acceptors", "1", "--plugins", "egress_hosts.MapTestHosts", "--basic-auth", "corp:pr0xy-s3cret",
            stdout=sink, stderr=sink, env=env,
        )  # fmt: skip
        try:
            for _ in range(100):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            yield f"http://corp:pr0xy-s3cret@127.0.0.1:{port}", log
        finally:
            process.terminate()
            await process.wait()


def sidecar_config(stack: Stack, **network: object) -> dict:
    config = stack.sidecar_config()
    config["upstream"] = {"url": stack.upstream_url, "allow_insecure": True, "probe": False}
    return {**config, "network": network}


async def test_token_and_chat_go_through_the_forward_proxy(
    hidden_stack: Stack, forward_proxy: tuple[str, Path], run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, log = forward_proxy
    assert "emu.test" in hidden_stack.upstream_url and "emu.test" in hidden_stack.authority_host
    running = await run_sidecar(sidecar_config(hidden_stack, proxy=proxy))
    await wait_ready(running)
    async with aiohttp.ClientSession() as http, http.post(running.url + CHAT, json={"messages": []}) as response:
        assert response.status == 200
    entra_port = re.search(r":(\d+)$", hidden_stack.authority_host).group(1)  # type: ignore[union-attr]
    chat = re.compile(r"POST emu\.test:\d+/api/openai/deployments/gpt-4o-mini/chat/completions")
    await running.aclose()  # the proxy writes its access lines as each connection ends: end the pooled ones
    for _ in range(100):
        seen = log.read_text()
        if f"CONNECT emu.test:{entra_port}" in seen and chat.search(seen):
            break
        await asyncio.sleep(0.05)
    assert f"CONNECT emu.test:{entra_port}" in seen  # the token request, tunnelled (TLS with tls.ca_bundle)
    assert chat.search(seen)
    (seen_upstream,) = hidden_stack.upstream.requests
    assert seen_upstream.claims is not None  # the token that went through the proxy was accepted
    assert "pr0xy-s3cret" not in "\n".join(record.getMessage() for record in caplog.records)


async def test_without_the_proxy_nothing_reaches_the_hidden_emulators(
    hidden_stack: Stack, run_sidecar: StartSidecar
) -> None:
    """The control: the same configuration without network.proxy cannot even resolve emu.test."""
    running = await run_sidecar(sidecar_config(hidden_stack))
    async with aiohttp.ClientSession() as http, http.post(running.url + CHAT, json={"messages": []}) as response:
        assert response.status in (502, 503)
    assert hidden_stack.entra.token_requests == 0 and hidden_stack.upstream.requests == []
