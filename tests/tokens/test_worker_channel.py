"""`workers: N` behind one seam: the parent's broker serves the workers through the Authorizer interface as the
authorizer's observer, and a worker's ChannelAuthorizer reports the parent's identity-provider calls to the
observer it was built with (its app's metrics). Over real socketpairs; the provider is scripted so that
failures and counts are exact (the processes themselves are tested in tests/test_workers.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from sidecar.token_channel import ChannelAuthorizer, TokenBroker
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager

FAST = RetryPolicy(first_delay=0.01, max_delay=0.01, min_interval=0.0)


class FailingOnce(TokenProvider):
    flow = "client_credentials"

    def __init__(self) -> None:
        self.calls = 0

    async def fetch(self) -> AccessToken:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.calls == 1:
            raise IdentityError("temporarily_unavailable: down", retryable=True)
        return AccessToken(f"token-{self.calls}", time.time() + 3600)


async def test_a_worker_reports_the_parents_calls_to_its_observer() -> None:
    parent, child = socket.socketpair()
    broker = TokenBroker([parent])
    provider = FailingOnce()
    manager = TokenManager(provider, retry=FAST, observer=broker.observe)
    seen: list[tuple[str, str, float]] = []
    worker = ChannelAuthorizer(child, "client_credentials", observer=lambda *call: seen.append(call))
    await broker.start(manager)
    await worker.start()  # asks for a token at once: the first call fails, the refresh loop is not running
    try:
        with pytest.raises(IdentityError):
            await asyncio.wait_for(worker.token_for({}), 5)
        await manager.start()  # its first fetch succeeds and is pushed to the worker unasked
        deadline = time.monotonic() + 5
        while not worker.is_ready():
            assert time.monotonic() < deadline, "the new token never reached the worker"
            await asyncio.sleep(0.01)
        assert await worker.token_for({}) == "token-2" and provider.calls == 2
        assert [(flow, outcome) for flow, outcome, _ in seen] == [
            ("client_credentials", "failure"),
            ("client_credentials", "success"),
        ]
        assert all(seconds >= 0.05 for _, _, seconds in seen)  # the time the provider took, as the parent saw it
    finally:
        await worker.aclose()
        await broker.aclose()
        await manager.aclose()


async def test_a_failing_observer_never_breaks_getting_tokens(caplog: pytest.LogCaptureFixture) -> None:
    def broken(flow: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("metrics backend gone")

    provider = FailingOnce()
    provider.calls = 1  # its next fetch succeeds
    manager = TokenManager(provider, retry=FAST, observer=broken)
    try:
        with caplog.at_level(logging.ERROR, logger="sidecar.tokens"):
            assert await asyncio.wait_for(manager.token_for({}), 5) == "token-2"
        assert "token observer failed" in caplog.text
        assert manager.is_ready()
    finally:
        await manager.aclose()
