"""The token manager's policy (sidecar/tokens/manager.py): caching, single-flight, refresh before expiry, backoff,
recovery, and the identity provider's protection.

Most tests drive the manager with a scripted provider of ours, so failures and timings are exact; the last ones
watch the same policy from outside: callers keep calling through the real sidecar, msal asks the Entra ID
emulator, and the emulator counts every token request. Entra throttles the whole application when one client
floods it, so those drive a fault that used to turn caller traffic into token requests and check that the
count stays small (and that the callers hear why)."""

from __future__ import annotations

import asyncio
import calendar
import logging
import re
import time
from collections import Counter

import aiohttp
import pytest
from harness import BODY, CHAT, StartSidecar, config_for, post_chat, readyz, until, wait_ready

from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager, refresh_at
from sidecar_emulators import Stack

CALLERS = 10
FAST_RETRY = RetryPolicy(first_delay=0.05, max_delay=0.2, min_interval=0.0)


class ScriptedProvider(TokenProvider):
    flow = "scripted"

    def __init__(self, lifetime: float = 3600, delay: float = 0.05) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.started: list[float] = []  # when each fetch began (monotonic)
        self.failing = False
        self.closed = False

    async def fetch(self) -> AccessToken:
        self.calls += 1
        self.started.append(time.monotonic())
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
    provider = ScriptedProvider(lifetime=3.0)
    manager = TokenManager(provider, refresh_margin=3, retry=FAST_RETRY)
    await manager.start()
    first = await manager.token_for({})
    held = manager.current
    assert held is not None
    # the second token lives 5 s: renewed at half-life, usable until 1 s before its expiry, so the failing
    # renewals below leave 1.5 s in which requests must still get it
    provider.lifetime = 5.0
    # renewed at half-life (the margin is more than half the lifetime), with nobody asking
    await until(lambda: manager.current is not held, what="the renewal")
    assert held.expires_on > time.time()  # before the first token expired
    second = await manager.token_for({})
    assert second != first
    provider.failing = True
    calls_before = provider.calls
    # the current token stays valid for a while: requests keep getting it while the loop retries
    assert await manager.token_for({}) == second
    await until(lambda: provider.calls > calls_before, what="the loop's retry")  # with backoff
    assert await manager.token_for({}) == second
    # past the expiry skew: no expired token is ever handed out
    await until(lambda: not manager.is_ready(), what="the token to expire")
    with pytest.raises(IdentityError) as caught:
        await manager.token_for({})
    assert caught.value.code == "AADSTS90033"
    provider.failing = False
    await until(manager.is_ready, what="the retry loop to recover by itself")
    assert (await manager.token_for({})).startswith("token-")
    await manager.aclose()


async def test_requests_do_not_hammer_a_failing_provider() -> None:
    provider = ScriptedProvider(delay=0.0)
    provider.failing = True
    manager = TokenManager(provider, retry=RetryPolicy(first_delay=10, max_delay=10))
    await manager.start()
    await until(lambda: manager.last_error is not None, what="the first fetch to fail")
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


async def test_a_rejected_replacement_pauses_rejection_refreshes(caplog: pytest.LogCaptureFixture) -> None:
    provider = ScriptedProvider()
    manager = TokenManager(provider, retry=FAST_RETRY)
    await manager.start()
    first = await manager.token_for({})
    assert set(await asyncio.gather(*(manager.token_after_rejection({}, first) for _ in range(20)))) == {"token-2"}
    # a late rejection of the replaced token costs nothing
    assert await manager.token_after_rejection({}, first) == "token-2"
    assert provider.calls == 2
    # token-2, fetched because token-1 was rejected, is rejected too: asking again cannot help
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar.tokens"):
        answers = await asyncio.gather(*(manager.token_after_rejection({}, "token-2") for _ in range(20)))
        answers += [await manager.token_after_rejection({}, "token-2") for _ in range(100)]
    assert answers == [None] * 120  # "no new token now": the callers get the upstream's 401
    assert provider.calls == 2
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "rejects tokens fresh from the identity provider" in warning
    assert "auth.scope" in warning and "app role" in warning
    assert "30 s" in warning
    assert manager.is_ready()  # requests still get token-2 (the upstream's answer is theirs to see)
    await manager.aclose()


def pauses_logged(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The rejection pauses the manager announced, in seconds (the operator's warning says how long)."""
    return [
        float(re.search(r"for ([\d.]+) s", r.getMessage()).group(1))  # type: ignore[union-attr]
        for r in caplog.records
        if "rejects tokens fresh" in r.getMessage()
    ]


async def test_the_rejection_pause_doubles_up_to_its_cap(caplog: pytest.LogCaptureFixture) -> None:
    provider = ScriptedProvider(delay=0.0)
    retry = RetryPolicy(first_delay=0.05, max_delay=0.2, min_interval=0.0, rejection_pause=0.2, max_rejection_pause=0.8)
    manager = TokenManager(provider, retry=retry)
    await manager.start()
    token = await manager.token_for({})
    caplog.set_level(logging.WARNING, logger="sidecar.tokens")
    deadline = time.monotonic() + 60  # ~2.2 s when all is well
    while len(pauses_logged(caplog)) < 5:  # an upstream that rejects every token, under steady traffic
        assert time.monotonic() < deadline, pauses_logged(caplog)
        token = await manager.token_after_rejection({}, token) or token
        await asyncio.sleep(0.01)
    await manager.aclose()
    pauses = pauses_logged(caplog)
    assert pauses == [0.2, 0.4, 0.8, 0.8, 0.8]  # doubling, then the cap held
    # and each was kept: fetch 2 replaced the first token, every later one came after a pause
    gaps = [later - earlier for earlier, later in zip(provider.started[1:], provider.started[2:], strict=False)]
    assert len(gaps) == 4
    assert all(gap >= pause - 0.01 for gap, pause in zip(gaps, pauses, strict=False)), (gaps, pauses)


async def test_the_rejection_pause_starts_over_after_a_quiet_while(caplog: pytest.LogCaptureFixture) -> None:
    provider = ScriptedProvider(delay=0.0)
    retry = RetryPolicy(
        first_delay=0.05, max_delay=0.2, min_interval=0.0, rejection_pause=0.25, max_rejection_pause=1.0
    )
    manager = TokenManager(provider, retry=retry)
    await manager.start()
    caplog.set_level(logging.WARNING, logger="sidecar.tokens")
    replacement: list[str] = []

    async def reject_until_replaced(token: str) -> str:
        async def replaced() -> bool:
            new = await manager.token_after_rejection({}, token)
            replacement[:] = [new] if new else []
            return new is not None

        await until(replaced, what="a new token after the pause")
        return replacement[0]

    token = await reject_until_replaced(await manager.token_for({}))  # token-2
    assert await manager.token_after_rejection({}, token) is None  # pause 1: 0.25 s
    token = await reject_until_replaced(token)
    assert await manager.token_after_rejection({}, token) is None  # pause 2: 0.5 s; a third would last 1 s
    await asyncio.sleep(0.5 + 1.1)  # no rejection for longer than max_rejection_pause after pause 2 ended
    token = await reject_until_replaced(token)
    assert await manager.token_after_rejection({}, token) is None  # a pause again ...
    await reject_until_replaced(token)
    await manager.aclose()
    assert pauses_logged(caplog) == [0.25, 0.5, 0.25]  # ... of 0.25 s, not 1 s


async def test_fetches_start_at_least_min_interval_apart() -> None:
    provider = ScriptedProvider(delay=0.0)
    provider.failing = True
    manager = TokenManager(provider, retry=RetryPolicy(first_delay=0.01, max_delay=0.01, min_interval=0.3))
    await manager.start()
    deadline = time.monotonic() + 60  # ~1.2 s when all is well
    while provider.calls < 5:  # the refresh loop retries, requests ask too: nothing may go faster
        assert time.monotonic() < deadline, provider.calls
        with pytest.raises(IdentityError):
            await manager.token_for({})
        await asyncio.sleep(0.005)
    await manager.aclose()
    gaps = [later - earlier for earlier, later in zip(provider.started, provider.started[1:], strict=False)]
    assert len(gaps) >= 4
    assert min(gaps) >= 0.29


@pytest.mark.parametrize("lifetime", [0.0, -7200.0, 0.5])
async def test_a_token_that_arrives_expired_is_refused_with_a_clock_hint(lifetime: float) -> None:
    provider = ScriptedProvider(lifetime=lifetime, delay=0.0)  # 0: no expires_in; -7200: clock 2 h ahead
    manager = TokenManager(provider, retry=RetryPolicy(first_delay=0.1, max_delay=0.4, min_interval=0.0))
    await manager.start()
    with pytest.raises(IdentityError) as caught:
        await manager.token_for({})
    message = str(caught.value)
    assert "check the host clock" in message
    stamps = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", message)  # the token's expiry, the local time
    expiry, local = (calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S UTC")) for stamp in stamps)
    assert abs(expiry - local - lifetime) <= 2
    assert "token-" not in message
    assert manager.current is None and not manager.is_ready()
    # a failure: the refresh loop backs off, and requests meanwhile (one every ~5 ms) get the cached error.
    # For 1.5 s, and longer if a busy machine has not let three fetches happen by then: the upper bound is
    # for the 1.5 s (a slow machine only lowers it), the lower one waits for the event.
    window = time.monotonic() + 1.5
    while time.monotonic() < window or provider.calls < 3:
        assert time.monotonic() < window + 60, provider.calls
        with pytest.raises(IdentityError):
            await manager.token_for({})
        await asyncio.sleep(0.005)
    await manager.aclose()
    assert 3 <= provider.calls <= 15  # 0.1 s, 0.2 s, then 0.4 s apart (by the loop or a request)


def test_refresh_schedule() -> None:
    now = 1000.0
    long_lived = AccessToken("t", now + 3600)
    due = refresh_at(long_lived, 300, now)
    assert now + 3600 - 300 - 30 <= due <= now + 3600 - 300
    hinted = AccessToken("t", now + 3600, refresh_on=now + 1800)
    assert refresh_at(hinted, 300, now) <= now + 1800
    short = AccessToken("t", now + 8)
    assert now + 3.6 <= refresh_at(short, 5, now) <= now + 4.0  # 8 s life, 5 s margin: at half-life, less jitter


async def test_identity_provider_outage_then_recovery(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.token_lifetime = 6  # renewed at half-life (3 s), usable until 5 s
    running = await run_sidecar(config_for(stack, auth={"refresh_margin": 4}))
    await wait_ready(running)
    stack.entra.fail_mode = "500"  # from now on every token request fails
    async with aiohttp.ClientSession() as http:
        # calls keep succeeding on the current token while its renewal fails ...
        statuses: list[int] = []

        async def renewal_failed() -> bool:
            statuses.append((await post_chat(http, running.url))[0])
            return stack.entra.token_requests >= 2

        await until(renewal_failed, what="a failed renewal", every=0.1)
        statuses.append((await post_chat(http, running.url))[0])
        assert set(statuses) == {200}

        # ... then the sidecar answers 503 and is not ready, without ever sending an expired token
        async def refused() -> bool:
            return (await post_chat(http, running.url))[0] != 200

        await until(refused, what="the token to expire", every=0.1)
        status, _, body = await post_chat(http, running.url)
        assert status == 503
        assert body["error"]["code"]
        assert "sidecar could not get a token" in body["error"]["message"]
        assert (await readyz(http, running.url))[0] == 503
        failed_attempts = stack.entra.token_requests
        # the identity provider comes back: everything recovers by itself
        stack.entra.fail_mode = None

        async def ready() -> bool:
            return (await readyz(http, running.url))[0] == 200

        await until(ready, what="readiness to come back", every=0.1)
        status, _, _ = await post_chat(http, running.url)
        assert status == 200
    # it retried during the outage, with backoff (msal also holds back 5xx retries), never once per request
    assert 2 <= failed_attempts < 15
    assert all(r.claims is not None for r in stack.upstream.requests)  # never an expired/invalid token


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
