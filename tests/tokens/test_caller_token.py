"""The caller's token (sidecar/tokens/caller_token.py): on_behalf_of checks it before it spends an identity-provider
call on it. A bad token gets 401 with its reason, costs no exchange, takes no cache slot and never makes the pod
unready; the tenant's keys are fetched through tls.ca_bundle, and refetched for unknown kids at a bounded rate."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import StartSidecar, chat, config_for, post_chat, readyz, sdk, until

from sidecar.claims import unverified_claims
from sidecar.config import Settings
from sidecar.tokens.caller_token import CallerTokenValidator
from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_JWT_BEARER
from sidecar_emulators.tls import TestCA

OTHER_TENANT = "0f0e0d0c-0b0a-4909-8807-060504030201"


def exchanges(stack: Stack) -> int:
    return stack.entra.requests_by_grant[GRANT_JWT_BEARER]


def user_token(stack: Stack, username: str, audience: str | None = None, **kwargs: Any) -> str:
    """What a front end sends: the user's token for the sidecar's API (by default aud = api://<client id>)."""
    stack.entra.register_user(username)
    return stack.entra.issue_user_token(
        username, client_id="chat-frontend", audience=audience or f"api://{stack.client_id}", **kwargs
    )


class Forger:
    """Bad caller tokens of every kind, each one distinct; `reason` is what the 401 must say about it."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.template = unverified_claims(user_token(stack, "mallory@contoso.example", lifetime=3600))
        self.tenant_kid = next(iter(stack.entra.public_keys))
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def claims(self, **changes: Any) -> dict[str, Any]:
        claims = {**self.template, "uti": uuid.uuid4().hex, **changes}
        return {name: value for name, value in claims.items() if value is not None}

    def kinds(self) -> list[tuple[str, Callable[[int], str]]]:
        stack, now = self.stack, int(time.time())
        return [
            ("is not a JWT", lambda i: f"junk-{i}"),
            ("is not a JWT", lambda i: f"not.a-jwt.{i}"),
            ("audience 'api://sidecar-demo-api' is not this", lambda i: user_token(stack, f"u{i}@x", stack.audience)),
            ("has expired", lambda i: user_token(stack, f"u{i}@x", expired=True)),
            (
                "signature does not verify against the tenant's keys",  # the tenant's kid, another key
                lambda i: jwt.encode(self.claims(), self.other_key, "RS256", headers={"kid": self.tenant_kid}),
            ),
            (
                "signature does not verify against the tenant's keys",  # a kid the tenant does not publish
                lambda i: jwt.encode(self.claims(), self.other_key, "RS256", headers={"kid": f"kid-{i}"}),
            ),
            (
                "issuer 'https://",  # signed by the tenant's key, but another tenant's issuer
                lambda i: stack.entra.sign(
                    self.claims(iss=stack.entra.issuer.replace(stack.tenant_id, OTHER_TENANT), tid=OTHER_TENANT)
                ),
            ),
            ("signed with alg 'none'", lambda i: jwt.encode(self.claims(), None, algorithm="none")),
            ("is not valid yet", lambda i: stack.entra.sign(self.claims(nbf=now + 3600, iat=now + 3600))),
            ("has no 'exp' claim", lambda i: stack.entra.sign(self.claims(exp=None))),
        ]

    def flood(self, per_kind: int) -> list[tuple[str, str]]:
        """(token, expected reason), kinds interleaved."""
        return [(make(i), reason) for i in range(per_kind) for reason, make in self.kinds()]


async def test_a_flood_of_bad_caller_tokens_gets_401s_and_costs_no_exchange(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of"))
    flood = Forger(stack).flood(per_kind=21)
    assert len(flood) >= 200
    async with aiohttp.ClientSession() as http:
        for start in range(0, len(flood), 30):  # 30 at once, and readiness between the bursts
            batch = flood[start : start + 30]
            answers = await asyncio.gather(*(post_chat(http, sidecar.url, token=token) for token, _ in batch))
            for (token, reason), (status, headers, body) in zip(batch, answers, strict=True):
                assert status == 401, body
                error = body["error"]
                assert error["code"] == "InvalidUserToken"
                assert reason in error["message"], (reason, error["message"])
                assert "\n" not in error["message"] and token not in error["message"]
                assert headers["x-should-retry"] == "false"
            assert (await readyz(http, sidecar.url))[0] == 200
    assert exchanges(stack) == 0
    assert stack.upstream.requests == []

    # the same sidecar still serves a good caller
    oid = stack.entra.register_user("alice@contoso.example")
    async with sdk(sidecar.url, azure_ad_token=user_token(stack, "alice@contoso.example", lifetime=3600)) as client:
        assert f"oid={oid}" in await chat(client)
    assert exchanges(stack) == 1


async def test_bad_tokens_take_no_cache_slot_from_good_users(stack: Stack, run_sidecar: StartSidecar) -> None:
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of", auth={"obo_cache_size": 2}))
    users = {name: stack.entra.register_user(name) for name in ("alice@contoso.example", "bob@contoso.example")}
    clients = {name: sdk(sidecar.url, azure_ad_token=user_token(stack, name, lifetime=3600)) for name in users}
    for name, oid in users.items():
        assert f"oid={oid}" in await chat(clients[name])
    assert exchanges(stack) == 2

    forger = Forger(stack)
    # the kinds that pass a quick look (a JWT, RS256, a kid): on the way in they could have taken a slot each
    flood = [(t, r) for t, r in forger.flood(per_kind=5) if not r.startswith(("is not a JWT", "signed with"))]
    async with aiohttp.ClientSession() as http:
        for token, reason in flood:
            status, _, body = await post_chat(http, sidecar.url, token=token)
            assert status == 401 and reason in body["error"]["message"]

    # both good users are still cached: no exchange for either (capacity 2, 40 bad tokens in between)
    for name, oid in users.items():
        assert f"oid={oid}" in await chat(clients[name])
    assert exchanges(stack) == 2
    for client in clients.values():
        await client.close()


async def test_readiness_is_the_sidecars_own_credential_never_a_callers_token(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of", auth={"client_secret": "not-the-secret"}))
    async with aiohttp.ClientSession() as http:
        # bad callers, with a broken sidecar credential: their tokens never reach the identity provider
        for token, _ in Forger(stack).flood(per_kind=2):
            assert (await post_chat(http, sidecar.url, token=token))[0] == 401
        assert exchanges(stack) == 0
        assert (await readyz(http, sidecar.url))[0] == 200
        # a good caller: the exchange shows the sidecar's own credential is wrong, which is the pod's problem
        status, _, body = await post_chat(http, sidecar.url, token=user_token(stack, "alice@contoso.example"))
        assert status == 503 and "invalid_client" in body["error"]["message"]
        ready_status, ready = await readyz(http, sidecar.url)
        assert ready_status == 503 and "invalid_client" in ready["reason"]


async def test_tokens_for_the_app_id_uri_and_api_uri_are_accepted(stack: Stack, run_sidecar: StartSidecar) -> None:
    app_id_uri = "https://contoso.example/chat-api"
    stack.entra.register_client(stack.client_id, secret=stack.client_secret, identifier_uris=[app_id_uri])
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of", auth={"app_id_uri": app_id_uri}))
    audiences = [f"api://{stack.client_id}", stack.client_id, app_id_uri]
    for n, audience in enumerate(audiences, start=1):
        oid = stack.entra.register_user(f"user{n}@contoso.example")
        token = user_token(stack, f"user{n}@contoso.example", audience=audience, lifetime=3600)
        async with sdk(sidecar.url, azure_ad_token=token) as client:
            assert f"oid={oid}" in await chat(client), audience
    assert exchanges(stack) == 3

    async with aiohttp.ClientSession() as http:
        other = user_token(stack, "user1@contoso.example", audience="https://contoso.example/other-api")
        status, _, body = await post_chat(http, sidecar.url, token=other)
    assert status == 401
    assert body["error"]["message"] == (
        "InvalidUserToken: the caller's token's audience 'https://contoso.example/other-api' is not this API "
        f"(expected one of '{stack.client_id}', 'api://{stack.client_id}', '{app_id_uri}')"
    )
    assert exchanges(stack) == 3


async def test_unknown_kids_refetch_the_keys_at_most_once_a_minute(stack: Stack, run_sidecar: StartSidecar) -> None:
    sidecar = await run_sidecar(config_for(stack, "on_behalf_of"))
    await until(lambda: stack.entra.jwks_requests >= 1, what="the keys fetched at start")
    fetched = stack.entra.jwks_requests
    forger = Forger(stack)
    tokens = [jwt.encode(forger.claims(), forger.other_key, "RS256", headers={"kid": f"k{i}"}) for i in range(60)]
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(post_chat(http, sidecar.url, token=token) for token in tokens[:30]))
        answers += [await post_chat(http, sidecar.url, token=token) for token in tokens[30:]]
    for status, _, body in answers:
        assert status == 401 and "signature does not verify" in body["error"]["message"]
    # 60 unknown kids, and the keys were fetched moments ago: no refetch (at most one a minute; the next test
    # shows the refetch once the interval has passed)
    assert stack.entra.jwks_requests == fetched
    assert exchanges(stack) == 0
    oid = stack.entra.register_user("alice@contoso.example")
    async with sdk(sidecar.url, azure_ad_token=user_token(stack, "alice@contoso.example")) as client:
        assert f"oid={oid}" in await chat(client)
    assert stack.entra.jwks_requests == fetched


async def test_the_refetch_interval_is_a_rate_not_a_ban(stack: Stack) -> None:
    """After the interval an unknown kid refetches the keys again (once), as a rotated key needs."""
    settings = Settings(**config_for(stack, "on_behalf_of"))  # type: ignore[arg-type]
    validator = CallerTokenValidator(settings.auth, settings.tls, refetch_interval=1.0)
    forger = Forger(stack)

    def unknown_kid() -> str:
        return jwt.encode(forger.claims(), forger.other_key, "RS256", headers={"kid": uuid.uuid4().hex})

    async def refused() -> None:
        with pytest.raises(Exception, match="signature does not verify") as caught:
            await validator.claims(unknown_kid())
        assert getattr(caught.value, "status", None) == 401

    try:
        good = user_token(stack, "alice@contoso.example")
        assert (await validator.claims(good))["oid"] == unverified_claims(good)["oid"]
        assert stack.entra.jwks_requests == 1
        started = time.monotonic()
        for _ in range(10):
            await refused()
        assert stack.entra.jwks_requests == 1  # the first fetch was just now: within the interval
        while stack.entra.jwks_requests == 1:
            assert time.monotonic() - started < 20, "no refetch after the interval"
            await refused()
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 1.0
        for _ in range(10):
            await refused()
        assert stack.entra.jwks_requests == 2
    finally:
        await validator.aclose()


async def test_ca_bundle_wins_for_the_keys_and_unreachable_keys_are_the_sidecars_503(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_ca = TestCA.create(tmp_path / "other-ca").ca_pem_path
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(name, str(other_ca))  # a corporate laptop's bundle, which does not sign the IdP
    oid = stack.entra.register_user("alice@contoso.example")
    token = user_token(stack, "alice@contoso.example")

    pinned = await run_sidecar(config_for(stack, "on_behalf_of"))  # tls.ca_bundle = the emulators' CA
    async with sdk(pinned.url, azure_ad_token=token) as client:
        assert f"oid={oid}" in await chat(client)
    await pinned.aclose()

    config = config_for(stack, "on_behalf_of")
    del config["tls"]  # the environment's bundle only: the tenant's keys cannot be fetched
    unpinned = await run_sidecar(config)
    async with aiohttp.ClientSession() as http:
        status, headers, body = await post_chat(http, unpinned.url, token=token)
        assert status == 503, body
        assert "signing keys" in body["error"]["message"] and "tls.ca_bundle" in body["error"]["message"]
        assert headers["x-should-retry"] == "true"
        ready_status, ready = await readyz(http, unpinned.url)
        assert ready_status == 503 and "signing keys" in ready["reason"]
    assert exchanges(stack) == 1  # only the pinned sidecar's
