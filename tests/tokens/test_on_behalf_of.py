"""on_behalf_of (sidecar/tokens/on_behalf_of.py): each caller's own token is exchanged for one for the upstream that
keeps the caller's identity; exchanges are cached per caller, refusals remembered briefly, a rejected fresh token
not exchanged again, and readiness is the sidecar's own credential."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import openai
import pytest
from harness import StartSidecar, chat, config_for, post_chat, readyz, sdk, until

from sidecar.claims import unverified_claims
from sidecar.config import Settings
from sidecar.server import RunningSidecar
from sidecar.tokens import on_behalf_of
from sidecar.tokens.base import IdentityError
from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_JWT_BEARER


def caller_token(stack: Stack, username: str, **kwargs: Any) -> str:
    """What a front end sends: the user's token for the sidecar's app (audience api://<sidecar client id>)."""
    return stack.entra.issue_user_token(
        username, client_id="chat-frontend", audience=f"api://{stack.client_id}", **kwargs
    )


def exchanges(stack: Stack) -> int:
    return stack.entra.requests_by_grant[GRANT_JWT_BEARER]


@pytest.fixture
async def sidecar(stack: Stack, run_sidecar: StartSidecar) -> RunningSidecar:
    return await run_sidecar(config_for(stack, "on_behalf_of"))


async def test_each_user_reaches_the_upstream_as_themselves_with_one_exchange_each(
    stack: Stack, sidecar: RunningSidecar
) -> None:
    users = {name: stack.entra.register_user(name) for name in ("alice@contoso.example", "bob@contoso.example")}
    clients = {name: sdk(sidecar.url, azure_ad_token=caller_token(stack, name, lifetime=3600)) for name in users}
    # both users at once, several requests each: every reply names the caller's own identity
    calls = [(name, chat(clients[name])) for _ in range(10) for name in users]
    replies = await asyncio.gather(*(call for _, call in calls))
    for (name, _), reply in zip(calls, replies, strict=True):
        assert f"aud={stack.audience} oid={users[name]} appid={stack.client_id}" in reply
    assert exchanges(stack) == 2
    # the same user again: served from the cache, no new exchange
    assert f"oid={users['alice@contoso.example']}" in await chat(clients["alice@contoso.example"])
    assert exchanges(stack) == 2
    for client in clients.values():
        await client.close()
    form = stack.entra.last_token_request_form
    assert form["requested_token_use"] == "on_behalf_of" and form["scope"].startswith(stack.scope)


async def test_an_expired_user_token_gets_401_without_an_exchange(stack: Stack, sidecar: RunningSidecar) -> None:
    expired = caller_token(stack, "carol@contoso.example", expired=True)
    async with sdk(sidecar.url, azure_ad_token=expired) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await chat(client)
    error = refused.value
    assert error.status_code == 401
    assert isinstance(error.body, dict) and error.body["code"] == "InvalidUserToken"
    assert error.body["message"] == "InvalidUserToken: the caller's token has expired"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["content-type"].startswith("application/json")
    assert exchanges(stack) == 0  # the sidecar saw it had expired: the identity provider was not asked
    assert not stack.upstream.requests


async def test_a_cached_exchange_ends_with_the_callers_token(stack: Stack, sidecar: RunningSidecar) -> None:
    """The sidecar does not keep a caller's session alive past the caller's own token: once that has expired,
    the caller gets 401 (and the identity provider is not asked to exchange an expired token)."""
    oid = stack.entra.register_user("dan@contoso.example")
    short_lived = caller_token(stack, "dan@contoso.example", lifetime=2)
    async with sdk(sidecar.url, azure_ad_token=short_lived) as client:
        assert f"oid={oid}" in await chat(client)
        assert exchanges(stack) == 1
        # the exchanged token is good for the emulator's hour; the caller's expires now
        await until(lambda: time.time() > unverified_claims(short_lived)["exp"], what="the caller's token to expire")
        with pytest.raises(openai.AuthenticationError) as refused:
            await chat(client)
    assert refused.value.body["code"] == "InvalidUserToken"  # type: ignore[index]
    assert exchanges(stack) == 1
    assert len(stack.upstream.requests) == 1


async def test_no_user_token_gets_401_json(stack: Stack, sidecar: RunningSidecar) -> None:
    async with sdk(sidecar.url) as client:  # an api-key, no Authorization header
        with pytest.raises(openai.AuthenticationError) as refused:
            await chat(client)
    error = refused.value
    assert error.status_code == 401
    assert isinstance(error.body, dict) and error.body["code"] == "MissingUserToken"
    assert "Authorization: Bearer" in error.body["message"]
    assert exchanges(stack) == 0
    assert not stack.upstream.requests


async def test_an_identity_provider_refusal_is_the_callers_and_takes_no_cache_slot(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    """A token that passes the sidecar's checks but that the identity provider refuses (an app-only token:
    on-behalf-of needs a user) is that caller's 401: it neither evicts a user nor makes the pod unready."""
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of", auth={"obo_cache_size": 1}))
    oid = stack.entra.register_user("alice@contoso.example")
    alice = sdk(sidecar.url, azure_ad_token=caller_token(stack, "alice@contoso.example", lifetime=3600))
    assert f"oid={oid}" in await chat(alice)
    app_token, _ = stack.entra.mint_app_token(client_id="a-daemon", oid=str(uuid.uuid4()), audience=stack.client_id)
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(post_chat(http, sidecar.url, token=app_token) for _ in range(20)))
        answers += [await post_chat(http, sidecar.url, token=app_token) for _ in range(10)]
        for status, headers, body in answers:
            assert status == 401
            assert body["error"]["code"] == "AADSTS70000" and "not a delegated" in body["error"]["message"]
            assert headers["x-should-retry"] == "false"
        assert exchanges(stack) == 2  # alice's, and one for the 30 requests with the refused token
        assert (await readyz(http, sidecar.url))[0] == 200
    assert f"oid={oid}" in await chat(alice)  # still cached, though the cache holds one user
    assert exchanges(stack) == 2
    await alice.close()


async def test_failures_are_remembered_briefly_and_boundedly(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """(The authorizer's own memory, seen from its object: msal throttles repeated refusals at the identity
    provider too, so the emulator's counters cannot show it.)"""
    monkeypatch.setattr(on_behalf_of, "FAILURE_CAPACITY", 16)
    monkeypatch.setattr(on_behalf_of, "FAILURE_TTL", 0.5)
    settings = Settings(**config_for(stack, "on_behalf_of"))  # type: ignore[arg-type]
    authorizer = on_behalf_of.build(settings)

    async def refusal(token: str) -> BaseException:
        with pytest.raises(IdentityError) as caught:
            await authorizer.token_for({"Authorization": f"Bearer {token}"})
        assert caught.value.status == 401
        return caught.value

    try:
        first = await refusal("junk-0")
        assert await refusal("junk-0") is first  # the same answer, not worked out again
        for i in range(1, 100):
            await refusal(f"junk-{i}")
        assert len(authorizer._failures) <= 16
        remembered_at = time.monotonic()
        latest = await refusal("junk-99")
        assert await refusal("junk-0") is not first  # forgotten: beyond capacity
        await until(lambda: time.monotonic() - remembered_at > 0.5, what="the memory to lapse")
        assert await refusal("junk-99") is not latest
    finally:
        await authorizer.aclose()


async def test_readiness_comes_back_without_traffic_once_the_credential_works(
    stack: Stack, run_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unready pod gets no traffic, so no caller's exchange can make it ready again: the sidecar proves its
    own credential in the background, backing off (one identity-provider call per attempt)."""
    monkeypatch.setattr(on_behalf_of, "RECOVERY_FIRST_DELAY", 0.3)
    stack.entra.set_client_secret(stack.client_id, "rotated-secret")  # the configured one is stale for now
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of"))

    def probes() -> int:  # the sidecar proves its credential with an app-only token
        return stack.entra.requests_by_grant["client_credentials"]

    async with aiohttp.ClientSession() as http:
        started = time.monotonic()  # before the failing exchange that starts the probing
        status, _, _ = await post_chat(http, sidecar.url, token=caller_token(stack, "alice@contoso.example"))
        assert status == 503
        assert (await readyz(http, sidecar.url))[0] == 503
        # probes fail meanwhile, each after a longer wait: 0.3 s, then 0.6 s (without the backoff, 0.6 s in all)
        await until(lambda: probes() >= 2, what="two probes")
        assert time.monotonic() - started >= 0.3 + 0.6
        assert (await readyz(http, sidecar.url))[0] == 503
        failing_probes = probes()
        stack.entra.set_client_secret(stack.client_id, stack.client_secret)  # the operator fixes the secret
        await until(lambda: probes() > failing_probes, what="a probe")

        async def ready() -> bool:
            return (await readyz(http, sidecar.url))[0] == 200

        await until(ready, what="readiness to come back", every=0.1)


async def test_a_rejected_fresh_token_is_not_exchanged_again(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream's 401 triggers at most one re-exchange per held token; when the freshly exchanged token is
    rejected too, the answer is None (relay the upstream's 401), with no exchange for a while."""
    monkeypatch.setattr(on_behalf_of, "REJECTION_BACKOFF", 1.0)
    settings = Settings(**config_for(stack, "on_behalf_of"))  # type: ignore[arg-type]
    authorizer = on_behalf_of.build(settings)
    await authorizer.start()
    try:
        headers = {"Authorization": f"Bearer {caller_token(stack, 'alice@contoso.example', lifetime=3600)}"}
        first = await authorizer.token_for(headers)
        assert exchanges(stack) == 1
        # ten requests rejected at once: one re-exchange
        fresh = await asyncio.gather(*(authorizer.token_after_rejection(headers, first) for _ in range(10)))
        assert len(set(fresh)) == 1 and fresh[0] != first
        assert exchanges(stack) == 2
        assert await authorizer.token_after_rejection(headers, first) == fresh[0]  # a late one: already replaced
        # the fresh token rejected too: no new token, no exchange, and the caller is still served the fresh one
        rejected_at = time.monotonic()
        assert await authorizer.token_after_rejection(headers, fresh[0]) is None
        assert await authorizer.token_after_rejection(headers, fresh[0]) is None
        assert await authorizer.token_for(headers) == fresh[0]
        assert exchanges(stack) == 2
        assert authorizer.is_ready()
        # after the backoff, one more re-exchange
        await until(lambda: time.monotonic() - rejected_at > 1.0, what="the backoff to pass")
        again = await authorizer.token_after_rejection(headers, fresh[0])
        assert again is not None and again != fresh[0]
        assert exchanges(stack) == 3
        assert await authorizer.token_after_rejection(headers, again) is None
        assert exchanges(stack) == 3
    finally:
        await authorizer.aclose()
