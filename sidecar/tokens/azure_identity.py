"""Flows served by azure-identity's asyncio credentials: managed identity, workload identity (AKS),
the Azure CLI, and DefaultAzureCredential. One adapter turns any of them into a TokenProvider."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessTokenInfo
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError
from azure.identity.aio import (
    AzureCliCredential,
    ClientAssertionCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
)

from sidecar.config import EXCLUDABLE_CREDENTIALS, PUBLIC_AUTHORITY, Settings
from sidecar.tokens._msal import _HINTS
from sidecar.tokens.base import AccessToken, IdentityError

_CODE = re.compile(r"\bAADSTS\d+\b")

# What to tell the operator when a credential is unavailable, by flow.
_UNAVAILABLE_HINTS = {
    "azure_cli": "run `az login` (and `az account set --subscription ...` if needed), then retry",
    "managed_identity": "no managed identity endpoint here: run on Azure with an identity assigned, "
    "or choose another auth.flow",
    "workload_identity": "set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE "
    "(the AKS workload identity webhook injects them when the pod has azure.workload.identity/use=true)",
    "default": "no credential in DefaultAzureCredential's chain worked; see the reasons above",
}


class AzureIdentityProvider:
    """Any azure-identity async credential as a TokenProvider for one scope."""

    def __init__(self, flow: str, credential: AsyncTokenCredential, scope: str) -> None:
        self.flow = flow
        self._credential = credential
        self._scope = scope

    async def fetch(self) -> AccessToken:
        try:
            info: AccessTokenInfo = await self._credential.get_token_info(self._scope)  # type: ignore[attr-defined]
        except CredentialUnavailableError as exc:
            raise IdentityError(
                _first_line(exc.message), retryable=True, hint=_UNAVAILABLE_HINTS.get(self.flow)
            ) from None
        except ClientAuthenticationError as exc:
            message = _first_line(exc.message or str(exc))
            match = _CODE.search(str(exc.message or exc))
            code = match.group(0) if match else None
            raise IdentityError(message, code=code, retryable=True, hint=_HINTS.get(code or "")) from None
        return AccessToken(token=info.token, expires_on=float(info.expires_on), refresh_on=info.refresh_on)

    async def aclose(self) -> None:
        await self._credential.close()


def _first_line(text: str) -> str:
    for line in text.replace("\r", "").splitlines():
        if line.strip():
            return line.strip()
    return text.strip() or "authentication failed"


def _transport_options(settings: Settings) -> dict[str, Any]:
    """`tls.ca_bundle` reaches azure-core's aiohttp transport as connection_verify."""
    ca_bundle = settings.tls.ca_bundle
    return {"connection_verify": str(ca_bundle)} if ca_bundle else {}


def _authority(settings: Settings, env_name: str = "AZURE_AUTHORITY_HOST") -> str | None:
    """The configured authority host wins; else the environment's (the AKS webhook sets it); else public."""
    if settings.auth.authority_host != PUBLIC_AUTHORITY:
        return settings.auth.authority_host
    return os.environ.get(env_name) or None


def managed_identity(settings: Settings) -> AzureIdentityProvider:
    auth = settings.auth
    identity: dict[str, str] = {}
    if auth.object_id:
        identity["object_id"] = auth.object_id
    elif auth.resource_id:
        identity["resource_id"] = auth.resource_id
    credential = ManagedIdentityCredential(
        client_id=auth.client_id if not identity else None,
        identity_config=identity or None,
        **_transport_options(settings),
    )
    return AzureIdentityProvider("managed_identity", credential, auth.scope)


class _FederatedTokenFile:
    """Reads the projected service-account token on every assertion: the kubelet rotates the file, and
    azure-identity's own WorkloadIdentityCredential would keep a stale copy for up to ten minutes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialUnavailableError(
                f"cannot read the federated token file {str(self.path)!r}: {exc.strerror}"
            ) from None


def workload_identity(settings: Settings) -> AzureIdentityProvider:
    auth = settings.auth
    tenant_id = auth.tenant_id or os.environ.get("AZURE_TENANT_ID")
    client_id = auth.client_id or os.environ.get("AZURE_CLIENT_ID")
    token_file = auth.federated_token_file or (
        Path(os.environ["AZURE_FEDERATED_TOKEN_FILE"]) if os.environ.get("AZURE_FEDERATED_TOKEN_FILE") else None
    )
    missing = [
        name
        for name, value in (
            ("auth.tenant_id (or AZURE_TENANT_ID)", tenant_id),
            ("auth.client_id (or AZURE_CLIENT_ID)", client_id),
            ("auth.federated_token_file (or AZURE_FEDERATED_TOKEN_FILE)", token_file),
        )
        if not value
    ]
    if missing:
        raise IdentityError(
            "workload identity needs " + ", ".join(missing),
            retryable=False,
            hint=_UNAVAILABLE_HINTS["workload_identity"],
        )
    assert tenant_id and client_id and token_file
    options = _transport_options(settings)
    authority = _authority(settings)
    if authority:
        options["authority"] = authority
    credential = ClientAssertionCredential(tenant_id, client_id, _FederatedTokenFile(token_file), **options)
    return AzureIdentityProvider("workload_identity", credential, auth.scope)


def azure_cli(settings: Settings) -> AzureIdentityProvider:
    tenant = {"tenant_id": settings.auth.tenant_id} if settings.auth.tenant_id else {}
    return AzureIdentityProvider("azure_cli", AzureCliCredential(**tenant), settings.auth.scope)


_EXCLUDABLE = {
    "environment": "exclude_environment_credential",
    "workload_identity": "exclude_workload_identity_credential",
    "managed_identity": "exclude_managed_identity_credential",
    "shared_token_cache": "exclude_shared_token_cache_credential",
    "visual_studio_code": "exclude_visual_studio_code_credential",
    "azure_cli": "exclude_cli_credential",
    "azure_developer_cli": "exclude_developer_cli_credential",
    "azure_powershell": "exclude_powershell_credential",
}
assert set(_EXCLUDABLE) == set(EXCLUDABLE_CREDENTIALS)


def default(settings: Settings) -> AzureIdentityProvider:
    auth = settings.auth
    options: dict[str, Any] = {name: True for key, name in _EXCLUDABLE.items() if key in auth.exclude_credentials}
    options.update(_transport_options(settings))
    authority = _authority(settings)
    if authority:
        options["authority"] = authority
    if auth.client_id:
        options["managed_identity_client_id"] = auth.client_id
        options["workload_identity_client_id"] = auth.client_id
    if auth.tenant_id:
        options["workload_identity_tenant_id"] = auth.tenant_id
    return AzureIdentityProvider("default", DefaultAzureCredential(**options), auth.scope)

