"""client_credentials: the app itself (a service principal with a secret, a secret file or a certificate)."""

from __future__ import annotations

import time
from typing import Any

from sidecar.config import ClientCredentialsAuth, NetworkConfig, Settings, TlsConfig
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, TokenProvider


class ClientCredentialsProvider(TokenProvider):
    flow = "client_credentials"

    def __init__(self, auth: ClientCredentialsAuth, tls: TlsConfig, network: NetworkConfig | None = None) -> None:
        self._scopes = [auth.scope]
        self._app = _msal.ConfidentialApp(auth, tls, network=network)

    def _acquire(self) -> tuple[float, dict[str, Any]]:
        app = self._app.get()
        # The manager decides when a token is stale; msal's own cache would hand back the old one.
        app.remove_tokens_for_client()
        requested_at = time.time()
        return requested_at, app.acquire_token_for_client(scopes=self._scopes)

    async def fetch(self) -> AccessToken:
        requested_at, result = await _msal.call_msal(self._acquire)
        return _msal.token_from_result(result, requested_at)

    async def aclose(self) -> None:
        self._app.close()


def build(settings: Settings) -> TokenProvider:
    assert isinstance(settings.auth, ClientCredentialsAuth)
    return ClientCredentialsProvider(settings.auth, settings.tls, settings.network)
