"""managed_identity: the Azure resource's system-assigned identity, or a user-assigned one, through
azure-identity's ManagedIdentityCredential (App Service, Functions, Container Apps, Arc, or IMDS)."""

from __future__ import annotations

from typing import Any

from sidecar.config import ManagedIdentityAuth, Settings
from sidecar.tokens.base import TokenProvider

_HINT = "no managed identity endpoint here: run on Azure with an identity assigned, or choose another auth.flow"


def managed_identity_selector(auth: ManagedIdentityAuth) -> dict[str, Any]:
    """ManagedIdentityCredential's arguments for the configured user-assigned identity (none: system-assigned).

    The aio credential puts `identity_config` on the wire as given, so each key must be the endpoint's own
    parameter name: a resource id is `mi_res_id` for App Service (IDENTITY_ENDPOINT is set) and `msi_res_id`
    for IMDS; an object id is `object_id` for both (App Service also knows it as principal_id).
    """
    if auth.client_id:
        return {"client_id": auth.client_id}
    if auth.object_id:
        return {"identity_config": {"object_id": auth.object_id}}
    if auth.resource_id:
        name = "mi_res_id" if auth.identity_endpoint else "msi_res_id"
        return {"identity_config": {name: auth.resource_id}}
    return {}


def build(settings: Settings) -> TokenProvider:
    from azure.identity.aio import ManagedIdentityCredential

    from sidecar.tokens._azure_identity import AzureIdentityProvider, transport_options

    auth = settings.auth
    assert isinstance(auth, ManagedIdentityAuth)
    options = {**managed_identity_selector(auth), **transport_options(settings)}

    def make() -> ManagedIdentityCredential:
        # the protocol (App Service, IMDS, ...) is read from the environment when the credential is built
        return ManagedIdentityCredential(**options)

    return AzureIdentityProvider("managed_identity", make, auth.scope, hint=lambda message: _HINT)
