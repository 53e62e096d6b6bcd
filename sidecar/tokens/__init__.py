"""Token flows behind one interface. The registry below is the only place that maps a flow to its module,
so adding a flow touches this file and its own module, never the proxy."""

from __future__ import annotations

import importlib

from sidecar.config import Flow, Settings
from sidecar.tokens.base import AccessToken, Authorizer, IdentityError, TokenObserver, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager

__all__ = [
    "AccessToken",
    "Authorizer",
    "IdentityError",
    "TokenManager",
    "TokenProvider",
    "build_authorizer",
    "build_provider",
]

# flow -> "module:factory"; a factory takes (settings) and returns a TokenProvider ...
_PROVIDERS: dict[Flow, str] = {
    Flow.CLIENT_CREDENTIALS: "sidecar.tokens.client_credentials:ClientCredentialsProvider.from_settings",
    Flow.DEVICE_CODE: "sidecar.tokens.user_signin:DeviceCodeProvider.from_settings",
    Flow.INTERACTIVE: "sidecar.tokens.user_signin:InteractiveProvider.from_settings",
    Flow.MANAGED_IDENTITY: "sidecar.tokens.azure_identity:managed_identity",
    Flow.WORKLOAD_IDENTITY: "sidecar.tokens.azure_identity:workload_identity",
    Flow.AZURE_CLI: "sidecar.tokens.azure_identity:azure_cli",
    Flow.DEFAULT: "sidecar.tokens.azure_identity:default",
}
# ... or (settings, observer) and returns an Authorizer, when tokens depend on the caller.
_AUTHORIZERS: dict[Flow, str] = {
    Flow.ON_BEHALF_OF: "sidecar.tokens.on_behalf_of:OnBehalfOfAuthorizer.from_settings",
}


def _factory(target: str):  # type: ignore[no-untyped-def]
    module_name, _, attribute = target.partition(":")
    found: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def build_provider(settings: Settings) -> TokenProvider | None:
    """The configured flow's provider; None when its tokens depend on the caller (it is an authorizer)."""
    target = _PROVIDERS.get(settings.auth.flow)
    return None if target is None else _factory(target)(settings)


def build_authorizer(
    settings: Settings, *, observer: TokenObserver | None = None, retry: RetryPolicy | None = None
) -> Authorizer:
    """The proxy's token source for the configured flow: a TokenManager around a provider, or the flow's own
    authorizer when tokens depend on the caller (on-behalf-of). `observer` is told of every identity-provider call."""
    provider = build_provider(settings)
    if provider is None:
        return _factory(_AUTHORIZERS[settings.auth.flow])(settings, observer)
    return TokenManager(provider, refresh_margin=settings.auth.refresh_margin, observer=observer, retry=retry)
