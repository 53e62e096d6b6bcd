"""azure_cli: the user signed in with `az login` (azure-identity's AzureCliCredential runs `az`)."""

from __future__ import annotations

from sidecar.config import AzureCliAuth, Settings
from sidecar.tokens.base import TokenProvider

_HINT = "run `az login` (and `az account set --subscription ...` if needed), then retry"
_MISSING_HINT = "install the Azure CLI (https://aka.ms/installazurecli) and run `az login`, or choose another auth.flow"


def _hint(message: str) -> str:
    return _MISSING_HINT if "not found" in message.lower() else _HINT


def build(settings: Settings) -> TokenProvider:
    from azure.identity.aio import AzureCliCredential

    from sidecar.tokens._azure_identity import AzureIdentityProvider

    auth = settings.auth
    assert isinstance(auth, AzureCliAuth)
    tenant = {"tenant_id": auth.tenant_id} if auth.tenant_id else {}
    return AzureIdentityProvider("azure_cli", lambda: AzureCliCredential(**tenant), auth.scope, hint=_hint)
