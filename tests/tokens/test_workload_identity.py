"""workload_identity (AKS): the projected service-account token is the client assertion, and the kubelet rotates
the file; every token request must read the file as it is then."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import StartSidecar, chat, config_for, run_cli, sdk, until, use_env, wait_ready, write_config
from rigs import AKS_ISSUER, AKS_SUBJECT

from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_CLIENT_CREDENTIALS

CLIENT_ID = "aks-chat-app"


def project(stack: Stack, token_file: Path, lifetime: float) -> str:
    """Write a service-account token the way the kubelet does: a new file swapped in atomically."""
    token = stack.entra.issue_federated_token(AKS_ISSUER, AKS_SUBJECT, lifetime=lifetime)
    temporary = token_file.with_suffix(".new")
    temporary.write_text(token)
    os.replace(temporary, token_file)
    return token


async def test_a_rotated_token_file_is_used_for_the_next_token_request(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.entra.register_client(CLIENT_ID)  # no secret: only the federated credential authenticates it
    stack.entra.register_federated_issuer(AKS_ISSUER, AKS_SUBJECT, CLIENT_ID)
    token_file = tmp_path / "azure-identity-token"
    first = project(stack, token_file, lifetime=3600)
    # what the workload identity webhook injects into the pod
    use_env(
        monkeypatch,
        {
            "AZURE_TENANT_ID": stack.tenant_id,
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": stack.authority_host,
        },
    )
    stack.entra.token_lifetime = 3
    sidecar = await run_sidecar(config_for(stack, "workload_identity", auth={"refresh_margin": 1.5}))
    await wait_ready(sidecar)
    assert stack.entra.last_token_request_form["client_assertion"] == first
    oid = stack.entra.directory.clients[CLIENT_ID].oid
    async with sdk(sidecar.url) as client:
        assert f"aud={stack.audience} oid={oid} appid={CLIENT_ID}" in await chat(client)

        rotated = project(stack, token_file, lifetime=3601)
        assert rotated != first
        await until(lambda: stack.entra.requests_by_grant[GRANT_CLIENT_CREDENTIALS] == 2, what="the renewal")
        form = stack.entra.last_token_request_form
        assert form["client_assertion"] == rotated
        assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        assert form["client_id"] == CLIENT_ID
        assert f"oid={oid} appid={CLIENT_ID}" in await chat(client)


async def test_a_missing_token_file_is_one_clear_line(stack: Stack, tmp_path: Path) -> None:
    auth = {"tenant_id": stack.tenant_id, "client_id": CLIENT_ID, "authority_host": stack.authority_host}
    config = config_for(stack, "workload_identity", auth=auth)
    path = write_config(tmp_path / "sidecar.yaml", config)
    missing = tmp_path / "not-projected" / "azure-identity-token"
    code, _, err = await run_cli("check", "--config", path, env={"AZURE_FEDERATED_TOKEN_FILE": str(missing)})
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("sidecar: could not get a token: cannot read the federated token file")
    assert str(missing) in line
    assert "azure.workload.identity/use=true" in line  # where the file comes from
