"""The identity provider is protected from the sidecar, seen from outside: callers keep calling through the
real sidecar, msal asks the Entra ID emulator, and the emulator counts every token request.

Entra throttles the whole application when one client floods it, so each test drives a fault that used to
turn caller traffic into token requests and checks the count stays small (and the callers hear why)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest
from harness import StartSidecar, config_for, wait_ready

from sidecar_emulators import Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'
CALLERS = 10


async def call_for(url: str, seconds: float) -> tuple[Counter[int], list[dict]]:
    """CALLERS concurrent callers posting back to back for `seconds`: their statuses, a few error bodies."""
    statuses: Counter[int] = Counter()
    bodies: list[dict] = []
    deadline = time.monotonic() + seconds

    async def caller(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            headers = {"Content-Type": "application/json"}
            async with http.post(url + CHAT, data=BODY, headers=headers) as response:
                statuses[response.status] += 1
                if response.status != 200 and len(bodies) < 20:
                    bodies.append(await response.json(content_type=None))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(caller(http) for _ in range(CALLERS)))
    return statuses, bodies


async def test_an_upstream_that_rejects_every_token_costs_a_few_token_requests(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Needs proxy.py to answer the caller with the upstream's 401 when token_after_rejection says None."""
    # The sidecar asks for another API's token: Entra issues it, the upstream refuses its audience.
    other_api = "api://some-other-api"
    stack.entra.register_resource(other_api)
    running = await run_sidecar(config_for(stack, auth={"scope": f"{other_api}/.default"}))
    await wait_ready(running)
    statuses, bodies = await call_for(running.url, 6.0)
    assert sum(statuses.values()) > 50  # the callers were busy the whole time
    # every caller hears the upstream's refusal and why; none is told the sidecar failed (5xx)
    assert set(statuses) == {401}, statuses
    assert all("auth.scope" in body["error"]["message"] for body in bodies)
    # the first token, one refresh for its rejection, then no more while the upstream refuses fresh tokens
    assert stack.entra.token_requests <= 4
    assert all(r.claims is None for r in stack.upstream.requests)  # the upstream never accepted one
    # the operator is told once, with the audience and what to check
    [warning] = [r.getMessage() for r in caplog.records if "rejects tokens fresh" in r.getMessage()]
    assert other_api in warning and "auth.scope" in warning and "app role" in warning


async def test_tokens_that_arrive_expired_cost_a_few_token_requests(stack: Stack, run_sidecar: StartSidecar) -> None:
    # expires_in 0: what a host clock far ahead of the identity provider's, or a response without a
    # lifetime, looks like to the sidecar
    stack.entra.token_lifetime = 0
    running = await run_sidecar(config_for(stack))
    statuses, bodies = await call_for(running.url, 4.0)
    assert sum(statuses.values()) > 50
    assert set(statuses) == {503}, statuses
    message = bodies[-1]["error"]["message"]
    assert "check the host clock" in message
    assert "UTC" in message
    assert stack.entra.token_requests <= 8
    assert stack.upstream.requests == []  # an expired token is never sent
