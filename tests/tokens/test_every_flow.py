"""Every flow end to end: the real openai SDK -> sidecar -> upstream emulator with the flow's identity; one token
request however many callers wait for it; renewal before expiry with nobody asking; `sidecar check`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import JWT, StartSidecar, chat, claims_printed, merge, run_cli, until, use_env, write_config
from rigs import FLOWS, Rigs, open_subprocess_transports, rigs_on, unclosed_resources

from sidecar.app import AUTHORIZER, STATE
from sidecar_emulators import Stack


@pytest.fixture
async def rigs(stack: Stack, tmp_path: Path) -> AsyncIterator[Rigs]:
    async with rigs_on(stack, tmp_path / "rigs") as built:
        yield built


@pytest.mark.parametrize("flow", FLOWS)
async def test_sdk_through_the_sidecar_and_one_token_request_for_100_callers(
    flow: str, stack: Stack, rigs: Rigs, run_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs.build(flow)
    use_env(monkeypatch, rig.env)
    rig.hold()  # the first token request waits at the identity provider until all 100 callers are queued
    try:
        sidecar = await run_sidecar(rig.config)
        client = rig.client(sidecar.url)
        calls = [asyncio.create_task(chat(client)) for _ in range(100)]
        await until(lambda: rig.token_requests() >= 1, what="the first token request")
        await until(
            lambda: sidecar.app[STATE]["in_flight"] >= 100 or any(call.done() for call in calls),
            what="100 callers in the sidecar",
        )
    finally:
        rig.release()
    replies = await asyncio.gather(*calls)
    await client.close()

    assert rig.token_requests() == 1
    for reply in replies:
        rig.expect_in_reply(reply, stack.audience)
    seen = stack.upstream.requests[-100:]
    assert len(seen) == 100
    assert {r.claims["aud"] for r in seen if r.claims} == {stack.audience}
    assert {r.claims["oid"] for r in seen if r.claims} == {rig.oid}
    assert {r.claims["appid"] for r in seen if r.claims} == {rig.appid}
    assert all(r.claims is not None for r in seen)


@pytest.mark.parametrize("flow", FLOWS)
async def test_token_is_renewed_before_it_expires(
    flow: str, stack: Stack, rigs: Rigs, run_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs.build(flow)
    use_env(monkeypatch, rig.env)
    # renewed at half-life (2 s); the JWT's exp (whole seconds) is at least 3 s after issue: 1 s to spare
    stack.entra.token_lifetime = 4  # managed identity tokens are signed by the Entra emulator too
    sidecar = await run_sidecar(merge(rig.config, {"auth": {"refresh_margin": 2}}))
    client = rig.client(sidecar.url)
    rig.expect_in_reply(await chat(client), stack.audience)
    first = stack.upstream.requests[-1].claims
    assert first is not None
    requested = rig.token_requests()
    upstream_calls = len(stack.upstream.requests)

    if rig.per_caller:
        # on-behalf-of holds a token per caller and renews it when that caller comes back after its refresh
        # point (at most half the lifetime after the exchange), still before expiry; callers arriving together
        # share the one exchange
        await asyncio.sleep(2.05)
        calls = [asyncio.create_task(chat(client)) for _ in range(20)]
        await until(lambda: rig.token_requests() > requested, what="the renewal")
        renewed_at = time.time()
        replies = await asyncio.gather(*calls)
        assert rig.token_requests() == requested + 1
    else:
        authorizer = sidecar.app[AUTHORIZER]

        def expires_at() -> float:
            return time.time() + (authorizer.seconds_until_expiry() or 0.0)

        first_expires_at = expires_at()
        await until(lambda: rig.token_requests() > requested, what="a renewal")
        renewed_at = time.time()
        assert len(stack.upstream.requests) == upstream_calls  # nobody asked for it
        await until(lambda: expires_at() > first_expires_at + 0.5, what="the renewed token in place")
        replies = [await chat(client)]
        assert rig.token_requests() == requested + 1
    await client.close()

    for reply in replies:
        rig.expect_in_reply(reply, stack.audience)
    second = stack.upstream.requests[-1].claims
    assert second is not None
    assert second["uti"] != first["uti"]  # a new token ...
    assert renewed_at < first["exp"]  # ... asked for while the first one was still valid


async def test_check_prints_the_claims_for_every_flow(stack: Stack, rigs: Rigs, tmp_path: Path) -> None:
    built = [await rigs.build(flow) for flow in FLOWS]

    async def check(flow: str, config: dict, env: dict[str, str]) -> tuple[int, str, str]:
        path = write_config(tmp_path / "check" / f"{flow}.yaml", config)
        return await run_cli("check", "--config", path, env=env)

    results = await asyncio.gather(*(check(rig.flow, rig.config, rig.env) for rig in built))
    for rig, (code, out, err) in zip(built, results, strict=True):
        assert code == 0, f"{rig.flow}: {err}"
        assert out.startswith(f"config ok: flow {rig.flow}, scope {stack.scope}")
        assert not JWT.search(out + err), "check must never print a token"
        claims = claims_printed(out)
        if rig.per_caller:
            # no caller token to exchange: the confidential client is verified with an app-only token for itself
            assert "no exchange was tried" in out
            assert "Verified the confidential client" in out
            assert claims["aud"] == stack.client_id
            assert claims["appid"] == stack.client_id
        else:
            assert claims["aud"] == stack.audience, rig.flow
            assert claims["oid"] == rig.oid, rig.flow
            assert claims["appid"] == rig.appid, rig.flow
            assert "expires in" in claims["exp"]


@pytest.mark.parametrize("flow", ["managed_identity", "workload_identity", "azure_cli", "default"])
async def test_azure_identity_credentials_leave_no_open_session(
    flow: str, stack: Stack, rigs: Rigs, run_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs.build(flow)
    use_env(monkeypatch, rig.env)
    with unclosed_resources() as leaks:
        # a sidecar that served requests and stopped
        sidecar = await run_sidecar(rig.config)
        client = rig.client(sidecar.url)
        rig.expect_in_reply(await chat(client), stack.audience)
        await client.close()
        await sidecar.aclose()
        # a sidecar stopped while its token request is in flight: that credential is closed too
        rig.hold()
        sidecar = await run_sidecar(rig.config)
        await until(lambda: rig.token_requests() >= 2, what="a token request in flight")
        await sidecar.aclose()
        rig.release()
        # the abandoned request ends: an `az` left running (azure_cli) exits and its transport closes
        await until(lambda: open_subprocess_transports() == 0, what="the abandoned token request to end", every=0.05)
    assert leaks == []


async def test_the_leak_check_sees_an_unclosed_credential(
    stack: Stack, rigs: Rigs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above would fail on a leak: an azure-identity credential opened and dropped without close()."""
    from azure.identity.aio import ManagedIdentityCredential

    rig = await rigs.build("managed_identity")
    use_env(monkeypatch, rig.env)
    with unclosed_resources() as leaks:
        credential = ManagedIdentityCredential()
        await credential.__aenter__()  # opens its aiohttp session
        del credential
    assert any("Unclosed client session" in leak for leak in leaks), leaks
