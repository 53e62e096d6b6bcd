"""managed_identity: the App Service protocol (IDENTITY_ENDPOINT) and IMDS, system- and user-assigned identities."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from harness import _WATCH, StartSidecar, chat, config_for, sdk, use_env

from sidecar.claims import unverified_claims
from sidecar.config import Settings
from sidecar.tokens import build_provider
from sidecar.tokens.base import TokenProvider
from sidecar_emulators import ManagedIdentity, ManagedIdentityEmulator, Stack

PROTOCOLS = ("app_service", "imds")


@pytest.fixture
async def mi(stack: Stack) -> AsyncIterator[ManagedIdentityEmulator]:
    async with ManagedIdentityEmulator(stack.entra) as emulator:
        _WATCH.secrets.add(emulator.identity_header)
        yield emulator


def protocol_env(mi: ManagedIdentityEmulator, protocol: str) -> dict[str, str]:
    return mi.app_service_env() if protocol == "app_service" else mi.imds_env()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("assigned", ["system", "user"])
async def test_the_sdk_reaches_the_upstream_as_the_managed_identity(
    protocol: str,
    assigned: str,
    stack: Stack,
    mi: ManagedIdentityEmulator,
    run_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_env(monkeypatch, protocol_env(mi, protocol))
    mi.add_user_assigned("uami-other")  # a second identity on the resource, never the one chosen by mistake
    identity = mi.add_user_assigned("uami-chat") if assigned == "user" else mi.system_identity
    assert identity is not None
    auth: dict[str, Any] = {}
    if assigned == "user":
        auth["client_id"] = identity.client_id  # a user-assigned identity selected by its client id
    sidecar = await run_sidecar(config_for(stack, "managed_identity", auth=auth))
    async with sdk(sidecar.url) as client:
        reply = await chat(client)
    assert f"aud={stack.audience} oid={identity.object_id} appid={identity.client_id}" in reply
    assert mi.requests_by_protocol == {protocol: 1}
    assert mi.last_query["resource"] == stack.audience
    assert mi.last_query.get("client_id") == (identity.client_id if assigned == "user" else None)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("selector", ["client_id", "object_id", "resource_id"])
async def test_a_user_assigned_identity_is_selected_by_each_of_its_ids(
    protocol: str, selector: str, stack: Stack, mi: ManagedIdentityEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each endpoint names its parameters differently; azure-identity's aio credential sends identity_config as is,
    so the sidecar must use the endpoint's own names (a resource id is mi_res_id / msi_res_id)."""
    use_env(monkeypatch, protocol_env(mi, protocol))
    mi.add_user_assigned("uami-other")
    identity: ManagedIdentity = mi.add_user_assigned("uami-chat")
    value = {"client_id": identity.client_id, "object_id": identity.object_id, "resource_id": identity.resource_id}
    settings = Settings(**config_for(stack, "managed_identity", auth={selector: value[selector]}))
    provider = build_provider(settings)
    assert isinstance(provider, TokenProvider)
    try:
        token = await provider.fetch()
    finally:
        await provider.aclose()
    claims = unverified_claims(token.token)
    assert (claims["oid"], claims["appid"], claims["aud"]) == (identity.object_id, identity.client_id, stack.audience)
    wire_name = {"client_id": "client_id", "object_id": "object_id"}.get(selector) or (
        "mi_res_id" if protocol == "app_service" else "msi_res_id"
    )
    assert mi.last_query[wire_name] == value[selector]
    assert mi.requests_by_protocol == {protocol: 1}
