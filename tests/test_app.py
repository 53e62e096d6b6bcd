"""The app's own routes (sidecar/app.py): /healthz, /readyz and 404 for everything the sidecar neither serves nor
forwards; none of them needs an inbound key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from harness import StartSidecar, config_for, wait_ready

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
