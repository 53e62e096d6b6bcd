"""Token flows behind one interface. The registry below is the only place that maps a flow to its module,
so adding a flow touches this file and its own module, never the proxy."""

from __future__ import annotations

import importlib

from sidecar.config import Flow, Settings
from sidecar.tokens.base import AccessToken, Authorizer, IdentityError, TokenProvider
from sidecar.tokens.manager import RetryPolicy, TokenManager, TokenObserver

__all__ = [
    "AccessToken",
    "Authorizer",
    "IdentityError",
    "TokenManager",
    "TokenProvider",
    "build_authorizer",
    "build_provider",
]

# flow -> "module:factory"; a factory takes (settings) and returns a TokenProvider or an Authorizer.
_FLOWS: dict[Flow, str] = {
    Flow.CLIENT_CREDENTIALS: "sidecar.tokens.client_credentials:ClientCredentialsProvider.from_settings",
    Flow.DEVICE_CODE: "sidecar.tokens.user_signin:DeviceCodeProvider.from_settings",
    Flow.INTERACTIVE: "sidecar.tokens.user_signin:InteractiveProvider.from_settings",
    Flow.ON_BEHALF_OF: "sidecar.tokens.on_behalf_of:OnBehalfOfAuthorizer.from_settings",
    Flow.MANAGED_IDENTITY: "sidecar.tokens.azure_identity:managed_identity",
    Flow.WORKLOAD_IDENTITY: "sidecar.tokens.azure_identity:workload_identity",
    Flow.AZURE_CLI: "sidecar.tokens.azure_identity:azure_cli",
    Flow.DEFAULT: "sidecar.tokens.azure_identity:default",
}


def _factory(flow: Flow):  # type: ignore[no-untyped-def]
    module_name, _, attribute = _FLOWS[flow].partition(":")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def build_provider(settings: Settings) -> TokenProvider | Authorizer:
    return _factory(settings.auth.flow)(settings)


def build_authorizer(
    settings: Settings, *, observer: TokenObserver | None = None, retry: RetryPolicy | None = None
) -> Authorizer:
    """The proxy's token source for the configured flow: a TokenManager around a provider, or the flow's own
    authorizer when tokens depend on the caller (on-behalf-of)."""
    built = build_provider(settings)
    if isinstance(built, TokenProvider):
        return TokenManager(built, refresh_margin=settings.auth.refresh_margin, observer=observer, retry=retry)
    set_observer = getattr(built, "set_observer", None)
    if set_observer is not None:
        set_observer(observer)
    return built
