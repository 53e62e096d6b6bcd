"""The app's own routes (sidecar/app.py): /healthz, /readyz and 404 for everything the sidecar neither serves nor
forwards; none of them needs an inbound key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from harness import BODY, CHAT, StartSidecar, config_for, wait_ready

from sidecar_emulators import Stack


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_health_readiness_and_not_found_without_a_key(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    stack.entra.fail_mode = "hang"  # no first token yet
    running = await run_sidecar(config_for(stack, inbound={"api_keys": ["key-one", "key-two"]}))
    async with http.get(running.url + "/healthz") as response:
        assert response.status == 200
    async with http.get(running.url + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "not ready"
    stack.entra.fail_mode = None
    await wait_ready(running)
    async with http.get(running.url + "/readyz") as response:
        assert response.status == 200

    for path in ("/", "/v1/chat/completions", "/openaix/models", "/admin"):
        async with http.get(running.url + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "NotFound"
    assert stack.upstream.requests == []


async def test_expect_100_continue(stack: Stack, run_sidecar: StartSidecar) -> None:
    """curl and other clients ask before they send a large body: the sidecar says 100 Continue, then forwards."""
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)
    host, port = running.url.removeprefix("http://").rsplit(":", 1)

    async def ask(expect: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection(host, int(port))
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\nExpect: {expect}\r\n\r\n"
        writer.write(head.encode())
        return reader, writer, await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)

    reader, writer, interim = await ask("100-continue")
    try:
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    # anything but 100-continue: 417, and nothing forwarded
    _, writer, answer = await ask("42-nonsense")
    writer.close()
    assert answer.startswith(b"HTTP/1.1 417 "), answer
    (seen,) = stack.upstream.requests
    assert seen.body == BODY
