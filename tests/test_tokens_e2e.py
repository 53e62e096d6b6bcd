"""Token behaviour seen from outside: through the real msal against the Entra ID emulator."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from harness import StartSidecar, config_for, wait_ready

from sidecar.emulators import Stack
from sidecar.tokens.base import IdentityError

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


async def status_of(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.post(url + CHAT, data=BODY, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.json()


async def readyz(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/readyz") as response:
        return response.status


async def test_identity_provider_outage_then_recovery(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.token_lifetime = 4
    running = await run_sidecar(config_for(stack, auth={"refresh_margin": 3}))
    await wait_ready(running)
    stack.entra.fail_mode = "500"  # from now on every token request fails
    async with aiohttp.ClientSession() as http:
        # calls keep succeeding on the current token until it expires ...
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            status, _ = await status_of(http, running.url)
            assert status == 200
            await asyncio.sleep(0.1)
        # ... then the sidecar answers 503 and is not ready, without ever sending an expired token
        deadline = time.monotonic() + 5
        while (status := (await status_of(http, running.url))[0]) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        status, body = await status_of(http, running.url)
        assert status == 503
        assert body["error"]["code"]
        assert "sidecar could not get a token" in body["error"]["message"]
        assert await readyz(http, running.url) == 503
        failed_attempts = stack.entra.token_requests
        # the identity provider comes back: everything recovers by itself
        stack.entra.fail_mode = None
        deadline = time.monotonic() + 10
        while await readyz(http, running.url) != 200:
            assert time.monotonic() < deadline, "did not recover"
            await asyncio.sleep(0.1)
        status, _ = await status_of(http, running.url)
        assert status == 200
    # it retried during the outage, with backoff (msal also holds back 5xx retries), never once per request
    assert 2 <= failed_attempts < 15
    assert all(r.claims is not None for r in stack.upstream.requests)  # never an expired/invalid token


async def test_wrong_secret_gives_503_with_the_aadsts_code_and_no_retry(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    running = await run_sidecar(config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 5
        while True:
            async with http.post(running.url + CHAT, data=BODY) as response:
                body = await response.json()
                if "AADSTS" in body["error"]["message"] or time.monotonic() > deadline:
                    break
            await asyncio.sleep(0.05)
        assert response.status == 503
        assert response.headers["x-should-retry"] == "false"
        assert body["error"]["code"] == "AADSTS7000215"
        assert "wrong-secret-value" not in str(body)
        assert await readyz(http, running.url) == 503
    assert stack.upstream.requests == []


async def test_identity_errors_never_carry_secrets(stack: Stack) -> None:
    from sidecar.config import Settings
    from sidecar.tokens.client_credentials import ClientCredentialsProvider

    settings = Settings(**config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    provider = ClientCredentialsProvider.from_settings(settings)
    try:
        await provider.fetch()
    except IdentityError as exc:
        error = exc
    else:  # pragma: no cover
        raise AssertionError("a wrong secret must fail")
    finally:
        await provider.aclose()
    assert error.code == "AADSTS7000215"
    assert not error.retryable
    for text in (str(error), repr(error), error.one_line(), repr(settings), str(settings.model_dump())):
        assert "wrong-secret-value" not in text
