"""on_behalf_of: each caller's own token is exchanged for one for the upstream that keeps the caller's identity."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest
from harness import StartSidecar, chat, config_for, sdk, until

from sidecar.claims import unverified_claims
from sidecar.server import RunningSidecar
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
