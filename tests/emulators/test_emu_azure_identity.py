"""The Entra and managed identity emulators driven by the real azure-identity (aio) credentials.

Configuration goes through public knobs only: constructor arguments, ``connection_verify`` (a CA
bundle path, handed to azure-core's aiohttp transport) and environment variables.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError
from azure.identity.aio import (
    ClientSecretCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from emu_support import CLIENT_ID, CLIENT_SECRET, DEMO_API, DEMO_SCOPE, verify

from sidecar_emulators import EntraEmulator, ManagedIdentityEmulator, TestCA

AKS_ISSUER = "https://oidc.prod-aks.azure.com/00000000-0000-0000-0000-000000000000/"
AKS_SUBJECT = "system:serviceaccount:sidecar:sidecar"


async def test_client_secret_credential(entra: EntraEmulator, ca: TestCA) -> None:
    async with ClientSecretCredential(
        entra.tenant_id, CLIENT_ID, CLIENT_SECRET, authority=entra.url, connection_verify=str(ca.ca_pem_path)
    ) as credential:
        token = await credential.get_token(DEMO_SCOPE)
    claims = verify(entra, token.token, DEMO_API)
    assert claims["appid"] == CLIENT_ID
    # azure-identity counts expires_in from when its answer arrived, the emulator from when it signed: across a
    # second boundary the two differ by one (the test failed so on a clean clone). A bare int: a failure here
    # must not print the AccessToken, whose repr carries the token.
    expires_on: int = token.expires_on
    assert abs(expires_on - claims["exp"]) <= 1, (expires_on, claims["exp"])
    assert entra.requests_by_grant["client_credentials"] == 1


async def test_client_secret_credential_wrong_secret(entra: EntraEmulator, ca: TestCA) -> None:
    async with ClientSecretCredential(
        entra.tenant_id, CLIENT_ID, "wrong", authority=entra.url, connection_verify=str(ca.ca_pem_path)
    ) as credential:
        with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
            await credential.get_token(DEMO_SCOPE)


async def test_workload_identity_credential(entra: EntraEmulator, ca: TestCA, tmp_path: Path) -> None:
    entra.register_client("wi-client")  # no secret: only the federated credential can authenticate it
    entra.register_federated_issuer(AKS_ISSUER, AKS_SUBJECT, "wi-client")
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(entra.issue_federated_token(AKS_ISSUER, AKS_SUBJECT))
    async with WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id="wi-client",
        token_file_path=str(token_file),
        authority=entra.url,
        connection_verify=str(ca.ca_pem_path),
    ) as credential:
        token = await credential.get_token(DEMO_SCOPE)
    claims = verify(entra, token.token, DEMO_API)
    assert claims["appid"] == "wi-client"
    assert claims["azpacr"] == "2"
    form = entra.last_token_request_form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert form["client_assertion"] == token_file.read_text()


@pytest.mark.parametrize(
    ("issuer", "subject", "audience", "code"),
    [
        ("https://other-issuer.example/", AKS_SUBJECT, "api://AzureADTokenExchange", "AADSTS700211"),
        (AKS_ISSUER, "system:serviceaccount:other:other", "api://AzureADTokenExchange", "AADSTS70021"),
        (AKS_ISSUER, AKS_SUBJECT, "api://wrong-audience", "AADSTS700212"),
    ],
)
async def test_workload_identity_rejections(
    entra: EntraEmulator, ca: TestCA, tmp_path: Path, issuer: str, subject: str, audience: str, code: str
) -> None:
    entra.register_client("wi-client")
    entra.register_federated_issuer(AKS_ISSUER, AKS_SUBJECT, "wi-client")
    entra.register_federated_issuer("https://other-issuer.example/", "x", "someone-else")
    token_file = tmp_path / "token"
    token_file.write_text(entra.issue_federated_token(issuer, subject, audience=audience))
    async with WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id="wi-client",
        token_file_path=str(token_file),
        authority=entra.url,
        connection_verify=str(ca.ca_pem_path),
    ) as credential:
        with pytest.raises(ClientAuthenticationError, match=code):
            await credential.get_token(DEMO_SCOPE)


async def test_managed_identity_app_service(
    managed_identity: ManagedIdentityEmulator, entra: EntraEmulator, clean_identity_env: pytest.MonkeyPatch
) -> None:
    for name, value in managed_identity.app_service_env().items():
        clean_identity_env.setenv(name, value)
    async with ManagedIdentityCredential() as credential:
        token = await credential.get_token(DEMO_SCOPE)
    claims = verify(entra, token.token, DEMO_API)
    assert managed_identity.system_identity is not None
    assert claims["appid"] == managed_identity.system_identity.client_id
    assert claims["oid"] == managed_identity.system_identity.object_id
    assert claims["idtyp"] == "app"
    assert managed_identity.requests_by_protocol == {"app_service": 1}
    assert managed_identity.last_query["api-version"] == "2019-08-01"
    assert managed_identity.last_query["resource"] == DEMO_API


async def test_managed_identity_app_service_user_assigned(
    managed_identity: ManagedIdentityEmulator, entra: EntraEmulator, clean_identity_env: pytest.MonkeyPatch
) -> None:
    uami = managed_identity.add_user_assigned("uami-client-id")
    for name, value in managed_identity.app_service_env().items():
        clean_identity_env.setenv(name, value)
    async with ManagedIdentityCredential(client_id="uami-client-id") as credential:
        token = await credential.get_token(DEMO_SCOPE)
    assert verify(entra, token.token, DEMO_API)["oid"] == uami.object_id
    async with ManagedIdentityCredential(identity_config={"mi_res_id": uami.resource_id}) as credential:
        token = await credential.get_token(DEMO_SCOPE)
    assert verify(entra, token.token, DEMO_API)["appid"] == "uami-client-id"
    async with ManagedIdentityCredential(client_id="not-assigned") as credential:
        with pytest.raises(ClientAuthenticationError, match="No MSI found"):
            await credential.get_token(DEMO_SCOPE)
    # The aio credential sends identity_config as-is: "resource_id" is not the App Service parameter.
    async with ManagedIdentityCredential(identity_config={"resource_id": uami.resource_id}) as credential:
        with pytest.raises(ClientAuthenticationError, match="mi_res_id"):
            await credential.get_token(DEMO_SCOPE)


async def test_managed_identity_imds(
    managed_identity: ManagedIdentityEmulator, entra: EntraEmulator, clean_identity_env: pytest.MonkeyPatch
) -> None:
    uami = managed_identity.add_user_assigned("uami-client-id")
    for name, value in managed_identity.imds_env().items():
        clean_identity_env.setenv(name, value)
    async with ManagedIdentityCredential() as credential:
        token = await credential.get_token(DEMO_SCOPE)
    assert managed_identity.system_identity is not None
    assert verify(entra, token.token, DEMO_API)["appid"] == managed_identity.system_identity.client_id
    async with ManagedIdentityCredential(identity_config={"object_id": uami.object_id}) as credential:
        token = await credential.get_token(DEMO_SCOPE)
    assert verify(entra, token.token, DEMO_API)["appid"] == "uami-client-id"
    assert managed_identity.last_query["api-version"] == "2018-02-01"
    assert managed_identity.requests_by_protocol == {"imds": 2}
    # Unknown identity: IMDS answers 400 "Identity not found", which azure-identity reports as unavailable.
    async with ManagedIdentityCredential(client_id="not-assigned") as credential:
        with pytest.raises(CredentialUnavailableError, match="Identity not found"):
            await credential.get_token(DEMO_SCOPE)


async def test_imds_requires_metadata_header(managed_identity: ManagedIdentityEmulator, ca: TestCA) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = f"{managed_identity.url}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={DEMO_API}"
        async with session.get(url) as response:
            assert response.status == 400
            assert (await response.json())["error_description"] == "Required metadata header not specified"
        async with session.get(url, headers={"Metadata": "true"}) as response:
            body = await response.json()
            assert response.status == 200
            assert isinstance(body["expires_in"], str) and isinstance(body["expires_on"], str)
            assert body["resource"] == DEMO_API
        async with session.get(url.replace(DEMO_API, "api://unknown"), headers={"Metadata": "true"}) as response:
            assert response.status == 400
            assert "AADSTS500011" in (await response.json())["error_description"]


async def test_managed_identity_tokens_are_recorded_by_entra(
    managed_identity: ManagedIdentityEmulator, entra: EntraEmulator, clean_identity_env: pytest.MonkeyPatch
) -> None:
    for name, value in managed_identity.imds_env().items():
        clean_identity_env.setenv(name, value)
    async with ManagedIdentityCredential() as credential:
        await credential.get_token(DEMO_SCOPE)
        await credential.get_token(DEMO_SCOPE)  # served from azure-identity's cache
    assert managed_identity.token_requests == 1
    assert len(entra.issued) == 1
    assert entra.token_requests == 0  # the managed identity endpoint is not the token endpoint
