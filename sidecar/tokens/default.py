"""default: azure-identity's DefaultAzureCredential, which tries a chain of credentials (environment, workload
identity, managed identity, Azure CLI, ...) and reads their settings from the environment itself."""

from __future__ import annotations

from typing import Any

from sidecar.config import EXCLUDABLE_CREDENTIALS, PUBLIC_AUTHORITY, DefaultAuth, Settings
from sidecar.tokens.base import TokenProvider

_HINT = (
    "no credential in DefaultAzureCredential's chain gave a token: set up one of them (e.g. `az login`, "
    "or run where a managed identity is assigned), or choose a specific auth.flow"
)
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


def build(settings: Settings) -> TokenProvider:
    from azure.identity.aio import DefaultAzureCredential

    from sidecar.tokens._azure_identity import AzureIdentityProvider, transport_options

    auth = settings.auth
    assert isinstance(auth, DefaultAuth)
    options: dict[str, Any] = {name: True for key, name in _EXCLUDABLE.items() if key in auth.exclude_credentials}
    # the proxy resolved for the identity provider; managed identity's http:// endpoints never take it
    options.update(transport_options(settings, talks_to=auth.authority_host or PUBLIC_AUTHORITY))
    if auth.authority_host:  # else DefaultAzureCredential's own: AZURE_AUTHORITY_HOST, or the public cloud
        options["authority"] = auth.authority_host
    if auth.client_id:
        options["managed_identity_client_id"] = auth.client_id
        options["workload_identity_client_id"] = auth.client_id
    if auth.tenant_id:
        options["workload_identity_tenant_id"] = auth.tenant_id
    return AzureIdentityProvider(
        "default", lambda: DefaultAzureCredential(**options), auth.scope, hint=lambda message: _HINT, chain=True
    )
