"""The token channel (sidecar/token_channel.py) between the parent's TokenManager and the worker processes'
authorizers, over real socket pairs: single-flight across workers, tokens pushed, errors, expiry, a lost parent."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from harness import until

from sidecar.token_channel import ChannelAuthorizer, TokenBroker
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager


class CountingProvider(TokenProvider):
    flow = "client_credentials"

    def __init__(self, lifetime: float = 3600) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.fail: IdentityError | None = None
        self.answering = asyncio.Event()  # cleared: fetches wait, as at a slow identity provider
        self.answering.set()

    async def fetch(self) -> AccessToken:
        self.calls += 1
        await asyncio.sleep(0.05)
        await self.answering.wait()
        if self.fail is not None:
            raise self.fail
        return AccessToken(f"token-{self.calls}", time.time() + self.lifetime)

    async def aclose(self) -> None:
        pass


async def test_channel_single_flight_push_and_rejection() -> None:
    provider = CountingProvider()
    pairs = [socket.socketpair() for _ in range(2)]
    broker = TokenBroker([parent for parent, _ in pairs])
    manager = TokenManager(provider, retry=RetryPolicy(min_interval=0.0, rejection_pause=0.2), observer=broker.observe)
    workers = [ChannelAuthorizer(child, "client_credentials") for _, child in pairs]
    await broker.start(manager)
    for worker in workers:
        await worker.start()
    try:
        # cold: both workers ask at once, the identity provider sees one call
        first = await asyncio.gather(*(w.token_for({}) for w in workers for _ in range(5)))
        assert set(first) == {"token-1"} and provider.calls == 1
        assert all(w.is_ready() for w in workers)
        # the upstream rejected token-1 in both workers: one refresh, and both get token-2
        second = await asyncio.gather(*(w.token_after_rejection({}, "token-1") for w in workers))
        assert second == ["token-2", "token-2"] and provider.calls == 2
        # token-2, fetched because token-1 was rejected, is rejected too: no new token now, and no call
        third = await asyncio.gather(*(w.token_after_rejection({}, "token-2") for w in workers))
        assert third == [None, None] and provider.calls == 2
        # a new token is pushed to every worker without being asked for
        await asyncio.sleep(0.3)  # past the manager's rejection pause
        assert await manager.token_after_rejection(None, "token-2") == "token-3"

        async def pushed() -> bool:  # token_for answers from the worker's own copy while it is valid
            return [await w.token_for({}) for w in workers] == ["token-3", "token-3"]

        await until(pushed, what="token-3 in both workers")
        assert provider.calls == 3
    finally:
        for worker in workers:
            await worker.aclose()
        await broker.aclose()
        await manager.aclose()


async def test_channel_errors_expiry_and_a_lost_parent() -> None:
    provider = CountingProvider(lifetime=1.5)  # valid for 0.5 s past the manager's expiry skew
    provider.fail = IdentityError("invalid_client: bad secret", code="AADSTS7000215", retryable=False)
    parent, child = socket.socketpair()
    broker = TokenBroker([parent])
    manager = TokenManager(provider, retry=RetryPolicy(first_delay=0.01, max_delay=0.01), observer=broker.observe)
    lost = asyncio.Event()
    worker = ChannelAuthorizer(child, "client_credentials", on_lost=lost.set)
    await broker.start(manager)
    await worker.start()
    try:
        with pytest.raises(IdentityError) as caught:
            await worker.token_for({})
        assert caught.value.code == "AADSTS7000215" and not caught.value.retryable
        assert worker.last_error is not None and not worker.is_ready()
        provider.fail = None
        await asyncio.sleep(0.05)  # past the (short) back-off the failure started
        token = await worker.token_for({})
        assert worker.is_ready()
        # the parent's renewal waits at the identity provider: the worker's copy reaches the expiry skew
        provider.answering.clear()
        await until(lambda: not worker.is_ready(), what="the token within the expiry skew")
        provider.answering.set()
        assert await worker.token_for({}) != token  # never injected: a new one is asked for
    finally:
        await broker.aclose()
        await manager.aclose()
    await asyncio.wait_for(lost.wait(), 10)  # the parent's end closed: the worker is told to stop
    with pytest.raises(IdentityError):
        await asyncio.wait_for(worker._wait("get", {"op": "get"}), 10)
    await worker.aclose()
