"""What the two sign-in flows (device_code, interactive) share: msal's PublicClientApplication with the
persistent token cache, and a provider that renews silently from the cached account's refresh token and signs
a person in for `sidecar login`. What a flow does when no account is cached is the flow's own (`_acquire`)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from abc import abstractmethod
from typing import Any

import msal

from sidecar.config import NetworkConfig, TlsConfig, UserSignInAuth
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, TokenProvider
from sidecar.tokens.token_cache import PersistentTokenCache

log = logging.getLogger("sidecar.tokens")

Answer = tuple[float, dict[str, Any]]  # when msal was asked, and its answer


def announce_device_code(message: str) -> None:
    """The sign-in instruction goes to stderr (visible in `docker compose up`) and to the log."""
    banner = "=" * 78
    print(f"\n{banner}\n  SIGN-IN NEEDED: {message}\n{banner}\n", file=sys.stderr, flush=True)
    log.warning("sign-in needed: %s", message)


class PublicClient:
    """The msal public client app and its persistent cache; every method blocks (run it in a thread)."""

    def __init__(self, auth: UserSignInAuth, tls: TlsConfig, network: NetworkConfig | None = None) -> None:
        self.cache = PersistentTokenCache(auth.token_cache_path)
        self.scopes = [auth.scope]
        self._client_id = auth.client_id
        self._options = _msal.msal_options(auth, tls, network)
        self._app: msal.PublicClientApplication | None = None
        self._building = threading.Lock()
        # Set by close(): a device flow polls for up to 15 minutes in a worker thread that nothing can cancel,
        # and the event loop waits for its threads when it shuts down; msal checks this between polls.
        self.closing = threading.Event()
        self.awaiting_user = False

    @property
    def app(self) -> msal.PublicClientApplication:
        """Built on first use, in a worker thread: msal reads the authority's metadata over the network when it
        builds the app, which must neither block the event loop nor stop the sidecar starting while the
        identity provider is unreachable (the manager retries instead)."""
        with self._building:
            if self._app is None:
                log.info("%s", self.cache.describe())
                self._app = msal.PublicClientApplication(
                    client_id=self._client_id, token_cache=self.cache, **self._options
                )
            return self._app

    def silent(self) -> Answer | None:
        """A fresh token from the refresh token of the cached account; None when a person must sign in (no
        account, or its sign-in has expired or was revoked)."""
        self.cache.forget_if_removed()
        accounts = self.app.get_accounts()  # the cache re-reads its file if another process changed it
        if not accounts:
            return None
        requested_at = time.time()
        # force_refresh: the manager asks only when it wants a new token, msal's copy would be the old one
        result = self.app.acquire_token_silent_with_error(self.scopes, account=accounts[0], force_refresh=True)
        if result is None or result.get("error") in ("invalid_grant", "interaction_required"):
            return None
        return requested_at, result

    def device_flow(self) -> Answer:
        flow = self.app.initiate_device_flow(scopes=self.scopes)
        if "user_code" not in flow:
            raise _msal.error_from_result(flow)
        announce_device_code(flow["message"])
        self.awaiting_user = True
        try:
            # polls until approved, declined or expired, or until the sidecar shuts down
            result = self.app.acquire_token_by_device_flow(flow, exit_condition=self._stop_polling)
        finally:
            self.awaiting_user = False
        return time.time(), result

    def _stop_polling(self, flow: dict[str, Any]) -> bool:
        return self.closing.is_set() or flow.get("expires_at", 0) < time.time()

    def browser(self, timeout: float = 600) -> Answer:
        requested_at = time.time()
        # without a timeout msal would wait forever for a browser that never comes back
        return requested_at, self.app.acquire_token_interactive(self.scopes, prompt="select_account", timeout=timeout)

    def username(self) -> str | None:
        accounts = self.app.get_accounts()
        return accounts[0].get("username") if accounts else None

    def sign_out(self) -> bool:
        return self.cache.clear()

    def close(self) -> None:
        self.closing.set()
        self._options["http_client"].close()


class SignInProvider(TokenProvider):
    """A sign-in flow's provider (TokenProvider and SignIn): fetch renews silently, or does what `_acquire` says
    when no account is cached; login signs a person in in the foreground."""

    def __init__(self, auth: UserSignInAuth, tls: TlsConfig, network: NetworkConfig | None = None) -> None:
        self._client = PublicClient(auth, tls, network)

    @abstractmethod
    def _acquire(self) -> Answer:
        """In a worker thread: a token from the cached account, or the flow's way to a sign-in."""

    @property
    def max_wait(self) -> float:
        # Requests must not hang while a person signs in: they get 503 at once then; a silent renewal is one
        # identity-provider call, worth waiting for.
        return 0.0 if self._client.awaiting_user else 30.0

    @property
    def cache_path(self) -> str:
        return str(self._client.cache.path)

    async def fetch(self) -> AccessToken:
        requested_at, result = await _msal.call_msal(self._acquire)
        return _msal.token_from_result(result, requested_at)

    async def login(self, *, browser: bool) -> str:
        """`sidecar login`: a device flow (or with `browser`, a browser sign-in) in the foreground."""
        requested_at, result = await _msal.call_msal(self._client.browser if browser else self._client.device_flow)
        _msal.token_from_result(result, requested_at)
        return self._client.username() or "unknown user"

    async def logout(self) -> bool:
        return await _msal.call_msal(self._client.sign_out)

    async def aclose(self) -> None:
        self._client.close()
