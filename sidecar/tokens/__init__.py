"""Token flows behind one interface (tokens/base.py), one module per flow. The registry below is the only place
that maps a flow to its module: adding a flow is its module, its config model (sidecar/config/auth.py) and one
line here; the app and the proxy never learn a flow's name.

Importing every flow module stays light: a flow that needs a heavy library (azure-identity, PyJWT's
cryptography) imports it in its build()."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import Flow, Settings
from sidecar.tokens import (
    azure_cli,
    client_credentials,
    default,
    device_code,
    interactive,
    managed_identity,
    on_behalf_of,
    workload_identity,
)
from sidecar.tokens.base import AccessToken, Authorizer, IdentityError, TokenObserver, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager

__all__ = [
    "AUTHORIZERS",
    "PROVIDERS",
    "AccessToken",
    "Authorizer",
    "IdentityError",
    "TokenManager",
    "TokenProvider",
    "build_authorizer",
    "build_provider",
]

# Flows whose token every request shares: the TokenManager caches and refreshes what the provider fetches.
PROVIDERS: dict[Flow, Callable[[Settings], TokenProvider]] = {
    Flow.CLIENT_CREDENTIALS: client_credentials.build,
    Flow.DEVICE_CODE: device_code.build,
    Flow.INTERACTIVE: interactive.build,
    Flow.MANAGED_IDENTITY: managed_identity.build,
    Flow.WORKLOAD_IDENTITY: workload_identity.build,
    Flow.AZURE_CLI: azure_cli.build,
    Flow.DEFAULT: default.build,
}
# Flows whose tokens depend on the caller: each is its own Authorizer, told of identity-provider calls.
AUTHORIZERS: dict[Flow, Callable[[Settings, TokenObserver | None], Authorizer]] = {
    Flow.ON_BEHALF_OF: on_behalf_of.build,
}


def build_provider(settings: Settings) -> TokenProvider | None:
    """The configured flow's provider; None when its tokens depend on the caller (see AUTHORIZERS)."""
    build = PROVIDERS.get(settings.auth.flow)
    return None if build is None else build(settings)


def build_authorizer(
    settings: Settings, *, observer: TokenObserver | None = None, retry: RetryPolicy | None = None
) -> Authorizer:
    """The proxy's token source for the configured flow: a TokenManager around its provider, or the flow's own
    authorizer when tokens depend on the caller. `observer` is told of every identity-provider call."""
    provider = build_provider(settings)
    if provider is None:
        return AUTHORIZERS[settings.auth.flow](settings, observer)
    return TokenManager(provider, refresh_margin=settings.auth.refresh_margin, observer=observer, retry=retry)
