"""workload_identity: an AKS pod's projected service-account token, exchanged for an Entra token
(azure-identity's ClientAssertionCredential over the file the workload identity webhook mounts)."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import Settings, WorkloadIdentityAuth
from sidecar.tokens.base import IdentityError, TokenProvider

_HINT = (
    "set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE "
    "(the AKS workload identity webhook injects them when the pod has azure.workload.identity/use=true)"
)
_TOKEN_FILE_HINT = (
    "the AKS workload identity webhook projects it when the pod is labelled azure.workload.identity/use=true "
    "and runs as a service account annotated with azure.workload.identity/client-id"
)


class FederatedTokenFile:
    """Reads the projected service-account token on every assertion: the kubelet rotates the file, and
    azure-identity's own WorkloadIdentityCredential would keep a stale copy for up to ten minutes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            # azure-identity lets this through as it is: the provider's caller gets it, hint and all
            raise IdentityError(
                f"cannot read the federated token file {str(self.path)!r}: {exc.strerror}",
                retryable=True,
                hint=_TOKEN_FILE_HINT,
            ) from None


def build(settings: Settings) -> TokenProvider:
    from azure.identity.aio import ClientAssertionCredential

    from sidecar.tokens._azure_identity import AzureIdentityProvider, transport_options

    # config has already taken each value from its key or from the webhook's AZURE_* variable
    auth = settings.auth
    assert isinstance(auth, WorkloadIdentityAuth)
    options = {**transport_options(settings, talks_to=auth.authority_host), "authority": auth.authority_host}
    assertion = FederatedTokenFile(auth.federated_token_file)
    tenant_id, client_id = auth.tenant_id, auth.client_id

    def make() -> ClientAssertionCredential:
        return ClientAssertionCredential(tenant_id, client_id, assertion, **options)

    return AzureIdentityProvider("workload_identity", make, auth.scope, hint=lambda message: _HINT)
