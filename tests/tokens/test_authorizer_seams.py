"""What the app and the CLI learn about a flow comes through the Authorizer's declared members: whether the
caller's Authorization header is the authorizer's input (then it is no inbound api key), the observer given at
construction (the identity-provider counters in /metrics), and `check` for a flow that has no caller."""

from __future__ import annotations

from pathlib import Path

from harness import StartSidecar, run_cli
from tokens_support import caller_token, exchanges, metrics_text, obo_config, post_chat, write_yaml

from sidecar_emulators import Stack


async def test_on_behalf_of_takes_the_inbound_key_from_api_key_only(stack: Stack, run_sidecar: StartSidecar) -> None:
    oid = stack.entra.register_user("alice@contoso.example")
    sidecar = await run_sidecar(obo_config(stack, inbound={"api_keys": ["inbound-key-1"]}))
    user = caller_token(stack, "alice@contoso.example")

    # the key in api-key and the user's own token in Authorization: through, as the user
    status, body = await post_chat(sidecar.url, {"api-key": "inbound-key-1", "Authorization": f"Bearer {user}"})
    assert status == 200, body
    assert f"oid={oid}" in body["choices"][0]["message"]["content"]
    # the key as a bearer token is the user's token slot, not a key: refused at the gate, before any exchange
    status, body = await post_chat(sidecar.url, {"Authorization": "Bearer inbound-key-1"})
    assert status == 401 and "inbound.api_keys" in body["error"]["message"]
    # a user token without the key: refused too
    status, body = await post_chat(sidecar.url, {"Authorization": f"Bearer {user}"})
    assert status == 401 and "inbound.api_keys" in body["error"]["message"]
    assert exchanges(stack) == 1
    assert len(stack.upstream.requests) == 1


async def test_other_flows_accept_the_inbound_key_as_a_bearer_token(stack: Stack, run_sidecar: StartSidecar) -> None:
    config = {**stack.sidecar_config(), "inbound": {"api_keys": ["inbound-key-1"]}}
    sidecar = await run_sidecar(config)
    status, body = await post_chat(sidecar.url, {"Authorization": "Bearer inbound-key-1"})  # the plain OpenAI client
    assert status == 200, body
    assert all("inbound-key-1" not in str(r.headers) for r in stack.upstream.requests)


async def test_on_behalf_of_exchanges_reach_the_metrics(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.register_user("bob@contoso.example")
    sidecar = await run_sidecar(obo_config(stack))
    status, _ = await post_chat(sidecar.url, {"Authorization": f"Bearer {caller_token(stack, 'bob@contoso.example')}"})
    assert status == 200
    assert exchanges(stack) == 1
    text = await metrics_text(sidecar.url)
    assert 'sidecar_token_acquisitions_total{flow="on_behalf_of",outcome="success"} 1.0' in text
    assert 'sidecar_identity_provider_duration_seconds_count{flow="on_behalf_of"} 1.0' in text


async def test_token_refuses_a_per_caller_flow_and_check_verifies_its_client(stack: Stack, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "obo.yaml", obo_config(stack))
    code, out, err = await run_cli("token", "--config", path)
    assert (code, out) == (1, "")
    assert "gets tokens per caller" in err and "Authorization header" in err
    assert exchanges(stack) == 0 and stack.entra.token_requests == 0  # refused before asking anyone

    code, out, err = await run_cli("check", "--config", path)
    assert code == 0, err
    assert "no exchange was tried" in out and f"({stack.client_id}/.default)" in out
    assert exchanges(stack) == 0 and stack.entra.token_requests == 1  # the app-only token for the app itself
