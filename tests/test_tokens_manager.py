"""The manager's own policy (caching, single-flight, backoff, recovery), with a scripted provider.

The flows themselves are tested through the real msal/azure-identity against the emulators elsewhere; here
the provider is ours on purpose, so failures and timings are exact."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.tokens.base import AccessToken, IdentityError
from sidecar.tokens.manager import RetryPolicy, TokenManager, refresh_at

FAST_RETRY = RetryPolicy(first_delay=0.05, max_delay=0.2)


class ScriptedProvider:
    flow = "scripted"

    def __init__(self, lifetime: float = 3600, delay: float = 0.05) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.failing = False
        self.closed = False

    async def fetch(self) -> AccessToken:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.failing:
            raise IdentityError("server_error: AADSTS90033: down", code="AADSTS90033")
        return AccessToken(f"token-{self.calls}", time.time() + self.lifetime)

    async def aclose(self) -> None:
        self.closed = True


async def test_single_flight_on_cold_start() -> None:
    provider = ScriptedProvider()
    manager = TokenManager(provider, retry=FAST_RETRY)
    await manager.start()
    tokens = await asyncio.gather(*(manager.token_for({}) for _ in range(200)))
    assert set(tokens) == {"token-1"}
    assert provider.calls == 1
    assert manager.is_ready()
    await manager.aclose()
    assert provider.closed


async def test_refreshes_before_expiry_and_keeps_serving_when_provider_fails() -> None:
    provider = ScriptedProvider(lifetime=4.0)
    manager = TokenManager(provider, refresh_margin=3, retry=FAST_RETRY)
    await manager.start()
    first = await manager.token_for({})
    await asyncio.sleep(2.3)  # refresh is due at half-life (margin > half the lifetime)
    second = await manager.token_for({})
    assert second != first
    provider.failing = True
    calls_before = provider.calls
    # the current token stays valid for a while: requests keep getting it while the loop retries
    assert await manager.token_for({}) == second
    await asyncio.sleep(2.0)
    assert provider.calls > calls_before  # the loop retries with backoff
    assert await manager.token_for({}) == second
    await asyncio.sleep(1.0)  # now past expiry: no expired token is ever handed out
    with pytest.raises(IdentityError) as caught:
        await manager.token_for({})
    assert caught.value.code == "AADSTS90033"
    assert not manager.is_ready()
    provider.failing = False
    await asyncio.sleep(0.5)  # the retry loop recovers by itself
    assert manager.is_ready()
    assert (await manager.token_for({})).startswith("token-")
    await manager.aclose()


async def test_requests_do_not_hammer_a_failing_provider() -> None:
    provider = ScriptedProvider(delay=0.0)
    provider.failing = True
    manager = TokenManager(provider, retry=RetryPolicy(first_delay=10, max_delay=10))
    await manager.start()
    await asyncio.sleep(0.05)
    for _ in range(50):
        with pytest.raises(IdentityError):
            await manager.token_for({})
    assert provider.calls <= 2
    await manager.aclose()


async def test_rejection_refreshes_once_for_many_callers() -> None:
    provider = ScriptedProvider()
    manager = TokenManager(provider, retry=FAST_RETRY)
    await manager.start()
    first = await manager.token_for({})
    replaced = await asyncio.gather(*(manager.token_after_rejection({}, first) for _ in range(20)))
    assert set(replaced) == {"token-2"}
    assert provider.calls == 2
    await manager.aclose()


def test_refresh_schedule() -> None:
    now = 1000.0
    long_lived = AccessToken("t", now + 3600)
    due = refresh_at(long_lived, 300, now)
    assert now + 3600 - 300 - 30 <= due <= now + 3600 - 300
    hinted = AccessToken("t", now + 3600, refresh_on=now + 1800)
    assert refresh_at(hinted, 300, now) <= now + 1800
    short = AccessToken("t", now + 8)
    assert now + 2.6 <= refresh_at(short, 5, now) <= now + 4.0  # 8 s life, 5 s margin: at ~3 s
