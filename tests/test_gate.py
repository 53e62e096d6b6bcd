"""The request gate (sidecar/gate.py): which request targets may be forwarded, and the inbound keys.

tests/test_hostile.py attacks the same door with raw bytes and a fuzz; here is what a well-behaved client meets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from harness import BODY, CHAT, StartSidecar, config_for, wait_ready
from yarl import URL

from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_JWT_BEARER


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_inbound_keys_and_dot_dot_segments(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    running = await run_sidecar(config_for(stack, inbound={"api_keys": ["key-one", "key-two"]}))
    await wait_ready(running)
    async with http.post(running.url + CHAT, data=BODY) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "Unauthorized"
        assert response.headers["x-should-retry"] == "false"
    async with http.post(running.url + CHAT, data=BODY, headers={"api-key": "key-wrong"}) as response:
        assert response.status == 401
    async with http.post(running.url + CHAT, data=BODY, headers={"api-key": "key-two"}) as response:
        assert response.status == 200
    async with http.post(running.url + CHAT, data=BODY, headers={"Authorization": "Bearer key-one"}) as response:
        assert response.status == 200  # the plain OpenAI client sends its api_key this way
    assert len(stack.upstream.requests) == 2
    assert all("api-key" not in r.headers for r in stack.upstream.requests)

    for path in ("/openai/../admin", "/openai/%2e%2e/admin", "/openai/deployments/%2E%2E/%2e%2E/x",
                 "/openai/..%2Fadmin", "/openai/%252e%252e/admin", "/openai/deployments/x/..\\..\\y"):  # fmt: skip
        raw = URL(running.url + path, encoded=True)  # the client must not normalise the '..' away itself
        async with http.get(raw, headers={"api-key": "key-one"}) as response:
            assert response.status == 400, path
            assert (await response.json())["error"]["code"] == "InvalidPath"
    assert len(stack.upstream.requests) == 2  # nothing more was forwarded


async def test_on_behalf_of_takes_the_key_from_api_key_only(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    """With on_behalf_of, Authorization carries the user's own token: a key sent there is no key."""
    running = await run_sidecar(config_for(stack, "on_behalf_of", inbound={"api_keys": ["key-one"]}))
    user = stack.entra.issue_user_token("alice@contoso.example", client_id="web", audience=f"api://{stack.client_id}")
    for headers in ({"Authorization": "Bearer key-one"}, {"Authorization": f"Bearer {user}"}):
        async with http.post(running.url + CHAT, data=BODY, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "Unauthorized"
    assert stack.entra.requests_by_grant[GRANT_JWT_BEARER] == 0  # refused at the gate, before any exchange
    headers = {"api-key": "key-one", "Authorization": f"Bearer {user}"}
    async with http.post(running.url + CHAT, data=BODY, headers=headers) as response:
        assert response.status == 200
    (seen,) = stack.upstream.requests
    assert seen.claims is not None and seen.claims["oid"] == stack.entra.directory.user("alice@contoso.example").oid
    assert "api-key" not in seen.headers
