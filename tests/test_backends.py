"""Several backends per route: failover on 429/503 and refused connections, honouring the backend's wait.

Two upstream emulators trust the same Entra emulator; scripted 429s play the throttled deployment.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from harness import StartSidecar, config_for, free_port, wait_ready
from multidict import CIMultiDict

from sidecar.app import METRICS
from sidecar.backends import retry_after
from sidecar_emulators import Scripted, Stack
from sidecar_emulators.upstream import UpstreamEmulator

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def second(stack: Stack) -> AsyncIterator[UpstreamEmulator]:
    """Backend B: another deployment of the same API, trusting the same tenant."""
    async with UpstreamEmulator(
        jwks=stack.entra.jwks, issuer=stack.entra.issuer, audience=stack.audience, base_path="/api"
    ) as emulator:
        yield emulator


def routes(*backends: dict) -> dict:
    return {"routes": [{"prefix": "/openai/", "upstream": list(backends)}]}


async def post(http: aiohttp.ClientSession, url: str) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.post(url + CHAT, data=BODY, headers={"Content-Type": "application/json"}) as response:
        return response.status, response.headers.copy(), await response.read()


async def test_a_throttled_backend_is_skipped_for_as_long_as_it_asks(
    stack: Stack, second: UpstreamEmulator, run_sidecar: StartSidecar
) -> None:
    config = config_for(
        stack, **routes({"url": stack.upstream_url, "name": "a"}, {"url": second.url, "priority": 1, "name": "b"})
    )
    running = await run_sidecar(config)
    await wait_ready(running)
    stack.upstream.script(Scripted.rate_limited(2))  # retry-after-ms: 2000
    async with aiohttp.ClientSession() as http:
        status, _, _ = await post(http, running.url)
        assert status == 200  # A said 429; the caller never saw it: B answered
        assert (len(stack.upstream.requests), len(second.requests)) == (1, 1)
        for _ in range(3):  # A cools down: everything goes to B meanwhile
            assert (await post(http, running.url))[0] == 200
        assert (len(stack.upstream.requests), len(second.requests)) == (1, 4)
        await asyncio.sleep(2.1)
        assert (await post(http, running.url))[0] == 200
        assert (len(stack.upstream.requests), len(second.requests)) == (2, 4)  # A is used again
    metrics = running.app[METRICS]
    assert metrics.cooldowns == {("/openai/", "a"): 1}
    assert metrics.backend_responses[("/openai/", "a", 429)] == 1
    assert metrics.backend_responses[("/openai/", "b", 200)] == 4


async def test_all_backends_cooling_gives_429_with_the_smallest_wait(
    stack: Stack, second: UpstreamEmulator, run_sidecar: StartSidecar
) -> None:
    config = config_for(stack, **routes({"url": stack.upstream_url}, {"url": second.url}))
    running = await run_sidecar(config)
    await wait_ready(running)
    stack.upstream.script(Scripted.rate_limited(5))
    second.script(Scripted.rate_limited(1.5))
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await post(http, running.url)
        assert status == 429  # both said 429: the caller gets the retry's answer as it was
        assert (len(stack.upstream.requests), len(second.requests)) == (1, 1)
        status, headers, body = await post(http, running.url)
        assert status == 429
        assert json.loads(body)["error"]["code"] == "AllBackendsCooling"
        assert 1000 <= int(headers["retry-after-ms"]) <= 1500  # B's wait, the smaller one
        assert headers["retry-after"] == "2"
        assert (len(stack.upstream.requests), len(second.requests)) == (1, 1)  # nothing was sent


async def test_a_refused_connection_fails_over_and_a_streamed_upload_does_not(
    stack: Stack, second: UpstreamEmulator, run_sidecar: StartSidecar
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api"
    config = config_for(stack, **routes({"url": closed, "name": "gone"}, {"url": second.url, "priority": 1}))
    running = await run_sidecar(config)
    await wait_ready(running)
    async with aiohttp.ClientSession() as http:
        assert (await post(http, running.url))[0] == 200
        assert len(second.requests) == 1
        assert running.app[METRICS].cooldowns == {("/openai/", "gone"): 1}

    # a chunked upload streams (nothing kept to send again): a 429 reaches the caller, the backend still cools
    config = config_for(stack, **routes({"url": stack.upstream_url, "name": "a"}, {"url": second.url, "priority": 1}))
    running = await run_sidecar(config)
    await wait_ready(running)
    stack.upstream.script(Scripted.rate_limited(1))

    async def chunks() -> AsyncIterator[bytes]:
        yield BODY

    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + CHAT, data=chunks()) as response:
            assert response.status == 429
        assert len(second.requests) == 1  # only the first test's request
        assert (await post(http, running.url))[0] == 200  # A cooling: B
        assert len(second.requests) == 2


async def test_one_backend_is_never_cooled_its_429_reaches_the_caller(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)
    stack.upstream.script(Scripted.rate_limited(30))
    async with aiohttp.ClientSession() as http:
        status, headers, _ = await post(http, running.url)
        assert status == 429 and headers["retry-after-ms"] == "30000"  # the upstream's own answer
        assert (await post(http, running.url))[0] == 200  # and the next request goes to it again


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([("retry-after-ms", "2000"), ("Retry-After", "9")], 2.0),
        ([("x-ms-retry-after-ms", "1500")], 1.5),
        ([("Retry-After", "7")], 7.0),
        ([("Retry-After", "-1")], None),
        ([("retry-after-ms", "soon")], None),
        ([("Retry-After", "nan")], None),
        ([("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")], 0.0),  # a date in the past: now
        ([], None),
    ],
)
def test_retry_after_reads_every_form_and_ignores_nonsense(headers: list[tuple[str, str]], seconds: float) -> None:
    assert retry_after(headers) == seconds
