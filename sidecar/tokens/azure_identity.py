"""Flows served by azure-identity's asyncio credentials: managed identity, workload identity (AKS),
the Azure CLI, and DefaultAzureCredential. One adapter turns any of them into a TokenProvider."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
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

from sidecar.config import (
    EXCLUDABLE_CREDENTIALS,
    AzureCliAuth,
    DefaultAuth,
    ManagedIdentityAuth,
    Settings,
    WorkloadIdentityAuth,
)
from sidecar.tokens._msal import _HINTS
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider

_CODE = re.compile(r"\bAADSTS\d+\b")

# What to tell the operator when a credential is unavailable, by flow.
_UNAVAILABLE_HINTS = {
    "azure_cli": "run `az login` (and `az account set --subscription ...` if needed), then retry",
    "managed_identity": "no managed identity endpoint here: run on Azure with an identity assigned, "
    "or choose another auth.flow",
    "workload_identity": "set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE "
    "(the AKS workload identity webhook injects them when the pod has azure.workload.identity/use=true)",
    "default": "no credential in DefaultAzureCredential's chain gave a token: set up one of them (e.g. `az login`, "
    "or run where a managed identity is assigned), or choose a specific auth.flow",
}
_CLI_MISSING_HINT = (
    "install the Azure CLI (https://aka.ms/installazurecli) and run `az login`, or choose another auth.flow"
)

_TOKEN_FILE_UNREADABLE = "cannot read the federated token file"
_TOKEN_FILE_HINT = (
    "the AKS workload identity webhook projects it when the pod is labelled azure.workload.identity/use=true "
    "and runs as a service account annotated with azure.workload.identity/client-id"
)

# azure-identity logs every failure at WARNING, chains with all their reasons over many lines; the manager (serve)
# and the CLI (check) report each failure once, as one line with a hint, so its own copy is only noise.
logging.getLogger("azure.identity").setLevel(logging.ERROR)

CredentialFactory = Callable[[], AsyncTokenCredential]


class AzureIdentityProvider(TokenProvider):
    """Any azure-identity async credential as a TokenProvider for one scope.

    A new credential is built for every fetch and closed right after it. azure-identity's credentials keep
    their own token cache and hand the cached token back until it is within five minutes of expiry (and for
    30 s after any request), so one long-lived credential would answer the manager's proactive refresh, and
    the refresh after the upstream rejected a token, with the very token it wants replaced.
    """

    def __init__(self, flow: str, make_credential: CredentialFactory, scope: str) -> None:
        self.flow = flow
        self._make_credential = make_credential
        self._scope = scope
        self._open: set[AsyncTokenCredential] = set()
        self._closed = False

    async def fetch(self) -> AccessToken:
        if self._closed:
            raise IdentityError("the sidecar is shutting down", retryable=False)
        try:
            credential = self._make_credential()
        except ValueError as exc:  # azure-identity validates its arguments and environment here
            raise IdentityError(
                _first_line(str(exc)), retryable=False, hint=_UNAVAILABLE_HINTS.get(self.flow)
            ) from None
        self._open.add(credential)
        try:
            info: AccessTokenInfo = await credential.get_token_info(self._scope)  # type: ignore[attr-defined]
        except CredentialUnavailableError as exc:
            message = _summary(exc.message or str(exc))
            raise IdentityError(message, retryable=True, hint=_unavailable_hint(self.flow, message)) from None
        except ClientAuthenticationError as exc:
            text = str(exc.message or exc)
            match = _CODE.search(text)
            code = match.group(0) if match else None
            message = _summary(text)
            hint = _HINTS.get(code or "") or (_unavailable_hint(self.flow, message) if self.flow == "default" else None)
            raise IdentityError(message, code=code, retryable=True, hint=hint) from None
        finally:
            self._open.discard(credential)
            # closing releases the credential's aiohttp session at once, not when the garbage collector
            # gets to it ("Unclosed client session"); a cancelled fetch (shutdown) closes it too
            await credential.close()
        return AccessToken(token=info.token, expires_on=float(info.expires_on), refresh_on=info.refresh_on)

    async def aclose(self) -> None:
        """Close what a fetch still holds: at shutdown the manager may leave one running."""
        self._closed = True
        for credential in list(self._open):
            with contextlib.suppress(Exception):
                await credential.close()
        self._open.clear()


def _first_line(text: str) -> str:
    for line in text.replace("\r", "").splitlines():
        if line.strip():
            return line.strip()
    return text.strip() or "authentication failed"


_ATTEMPTED = re.compile(r"^\t(\w+): (.*)$")


def _summary(text: str) -> str:
    """One line. For a credential chain (DefaultAzureCredential) the reasons of the credentials it tried are on
    the following lines: keep each one's first sentence, since they are the whole point of the message."""
    first = _first_line(text)
    reasons = []
    for line in text.replace("\r", "").splitlines():
        match = _ATTEMPTED.match(line)
        if match:
            name, reason = match.group(1), match.group(2).strip()
            reason = reason.removeprefix(name).strip().split(". ", 1)[0].rstrip(".")
            reasons.append(f"{name}: {reason}")
    if not reasons:
        return first
    return first.rstrip(".") + " (tried " + "; ".join(reasons) + ")"


def _unavailable_hint(flow: str, message: str) -> str | None:
    if flow == "azure_cli" and "not found" in message.lower():
        return _CLI_MISSING_HINT
    if flow == "workload_identity" and message.startswith(_TOKEN_FILE_UNREADABLE):
        return _TOKEN_FILE_HINT
    return _UNAVAILABLE_HINTS.get(flow)


def _transport_options(settings: Settings) -> dict[str, Any]:
    """`tls.ca_bundle` reaches azure-core's aiohttp transport as connection_verify."""
    ca_bundle = settings.tls.ca_bundle
    return {"connection_verify": str(ca_bundle)} if ca_bundle else {}


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


def managed_identity(settings: Settings) -> AzureIdentityProvider:
    auth = settings.auth
    assert isinstance(auth, ManagedIdentityAuth)
    options = {**managed_identity_selector(auth), **_transport_options(settings)}

    def make() -> AsyncTokenCredential:
        # the protocol (App Service, IMDS, ...) is read from the environment when the credential is built
        return ManagedIdentityCredential(**options)

    return AzureIdentityProvider("managed_identity", make, auth.scope)


class _FederatedTokenFile:
    """Reads the projected service-account token on every assertion: the kubelet rotates the file, and
    azure-identity's own WorkloadIdentityCredential would keep a stale copy for up to ten minutes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialUnavailableError(f"{_TOKEN_FILE_UNREADABLE} {str(self.path)!r}: {exc.strerror}") from None


def workload_identity(settings: Settings) -> AzureIdentityProvider:
    # config has already taken each value from its key or from the webhook's AZURE_* variable
    auth = settings.auth
    assert isinstance(auth, WorkloadIdentityAuth)
    options = {**_transport_options(settings), "authority": auth.authority_host}
    assertion = _FederatedTokenFile(auth.federated_token_file)
    tenant_id, client_id = auth.tenant_id, auth.client_id

    def make() -> AsyncTokenCredential:
        return ClientAssertionCredential(tenant_id, client_id, assertion, **options)

    return AzureIdentityProvider("workload_identity", make, auth.scope)


def azure_cli(settings: Settings) -> AzureIdentityProvider:
    auth = settings.auth
    assert isinstance(auth, AzureCliAuth)
    tenant = {"tenant_id": auth.tenant_id} if auth.tenant_id else {}
    return AzureIdentityProvider("azure_cli", lambda: AzureCliCredential(**tenant), auth.scope)


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
    assert isinstance(auth, DefaultAuth)
    options: dict[str, Any] = {name: True for key, name in _EXCLUDABLE.items() if key in auth.exclude_credentials}
    options.update(_transport_options(settings))
    if auth.authority_host:  # else DefaultAzureCredential's own: AZURE_AUTHORITY_HOST, or the public cloud
        options["authority"] = auth.authority_host
    if auth.client_id:
        options["managed_identity_client_id"] = auth.client_id
        options["workload_identity_client_id"] = auth.client_id
    if auth.tenant_id:
        options["workload_identity_tenant_id"] = auth.tenant_id
    return AzureIdentityProvider("default", lambda: DefaultAzureCredential(**options), auth.scope)
