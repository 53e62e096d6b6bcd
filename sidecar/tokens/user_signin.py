"""User sign-in flows through msal's PublicClientApplication: device code and interactive browser.

Both share one persistent token cache. `serve` renews silently with the refresh token; when there is no
account (or its refresh token is gone) device_code starts a device flow and prints the code, interactive asks
the operator to run `sidecar login --browser`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msal

from sidecar.config import Settings, TlsConfig, UserSignInAuth
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider
from sidecar.tokens.token_cache import PersistentTokenCache

log = logging.getLogger("sidecar.tokens")


class _PublicClient:
    """The msal public client app and its persistent cache; every method blocks (run it in a thread)."""

    def __init__(self, auth: UserSignInAuth, tls: TlsConfig) -> None:
        self.cache = PersistentTokenCache(auth.token_cache_path)
        self.scopes = [auth.scope]
        self._client_id = auth.client_id
        self._options = _msal.msal_options(auth, tls)
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
                self._app = msal.PublicClientApplication(
                    client_id=self._client_id, token_cache=self.cache, **self._options
                )
            return self._app

    def silent(self) -> tuple[float, dict[str, Any] | None]:
        """A fresh token from the refresh token of the cached account, or None when sign-in is needed."""
        self.cache.reload()
        accounts = self.app.get_accounts()
        if not accounts:
            return _msal.now(), None
        requested_at = _msal.now()
        # force_refresh: the manager asks only when it wants a new token, msal's copy would be the old one
        result = self.app.acquire_token_silent_with_error(self.scopes, account=accounts[0], force_refresh=True)
        self.cache.save()
        return requested_at, result

    def device_flow(self, announce: Callable[[str], None]) -> tuple[float, dict[str, Any]]:
        flow = self.app.initiate_device_flow(scopes=self.scopes)
        if "user_code" not in flow:
            raise _msal.error_from_result(flow)
        announce(flow["message"])
        self.awaiting_user = True
        try:
            # polls until approved, declined or expired, or until the sidecar shuts down
            result = self.app.acquire_token_by_device_flow(flow, exit_condition=self._stop_polling)
        finally:
            self.awaiting_user = False
        requested_at = _msal.now()
        self.cache.save()
        return requested_at, result

    def _stop_polling(self, flow: dict[str, Any]) -> bool:
        return self.closing.is_set() or flow.get("expires_at", 0) < time.time()

    def browser(self, timeout: float = 600) -> tuple[float, dict[str, Any]]:
        requested_at = _msal.now()
        # without a timeout msal would wait forever for a browser that never comes back
        result = self.app.acquire_token_interactive(self.scopes, prompt="select_account", timeout=timeout)
        self.cache.save()
        return requested_at, result

    def username(self) -> str | None:
        accounts = self.app.get_accounts()
        return accounts[0].get("username") if accounts else None

    def sign_out(self) -> bool:
        # The file is the whole sign-in (msal's remove_account only edits the cache): deleting it needs no
        # msal app, hence no identity provider, so logout works offline too.
        return self.cache.clear_file()

    def close(self) -> None:
        self.closing.set()
        self._options["http_client"].close()


def announce_device_code(message: str) -> None:
    """The sign-in instruction goes to stderr (visible in `docker compose up`) and to the log."""
    banner = "=" * 78
    print(f"\n{banner}\n  SIGN-IN NEEDED: {message}\n{banner}\n", file=sys.stderr, flush=True)
    log.warning("sign-in needed: %s", message)


def _needs_signin(result: dict[str, Any] | None) -> bool:
    return result is None or result.get("error") in ("invalid_grant", "interaction_required")


class DeviceCodeProvider(TokenProvider):
    flow = "device_code"
    pending_message = "waiting for a user to sign in: the device code is in the sidecar's log (stderr)"

    def __init__(self, auth: UserSignInAuth, tls: TlsConfig) -> None:
        self._client = _PublicClient(auth, tls)

    @property
    def max_wait(self) -> float:
        # Requests must not hang while a person signs in: they get 503 at once then; a silent renewal is one
        # identity-provider call, worth waiting for.
        return 0.0 if self._client.awaiting_user else 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeviceCodeProvider:
        assert isinstance(settings.auth, UserSignInAuth)
        return cls(settings.auth, settings.tls)

    def _acquire(self) -> tuple[float, dict[str, Any]]:
        requested_at, result = self._client.silent()
        if _needs_signin(result):
            return self._client.device_flow(announce_device_code)
        assert result is not None
        return requested_at, result

    async def fetch(self) -> AccessToken:
        requested_at, result = await _msal.call_msal(self._acquire)
        return _msal.token_from_result(result, requested_at)

    async def login(self, *, browser: bool) -> str:
        """`sidecar login`: a device flow (or with `browser`, a browser sign-in) in the foreground."""
        if browser:
            requested_at, result = await _msal.call_msal(self._client.browser)
        else:
            requested_at, result = await _msal.call_msal(self._client.device_flow, announce_device_code)
        _msal.token_from_result(result, requested_at)
        return self._client.username() or "unknown user"

    async def logout(self) -> bool:
        return await _msal.call_msal(self._client.sign_out)

    @property
    def cache_path(self) -> str:
        return str(self._client.cache.path)

    async def aclose(self) -> None:
        self._client.close()


class InteractiveProvider(DeviceCodeProvider):
    """Authorization code + PKCE in the system browser. `serve` only renews silently: a server cannot open a
    browser for someone, so an empty cache is an error that says to run `sidecar login --browser`."""

    flow = "interactive"
    pending_message = "not signed in yet: run `sidecar login --browser`"

    @classmethod
    def from_settings(cls, settings: Settings) -> InteractiveProvider:
        assert isinstance(settings.auth, UserSignInAuth)
        return cls(settings.auth, settings.tls)

    def _acquire(self) -> tuple[float, dict[str, Any]]:
        requested_at, result = self._client.silent()
        if _needs_signin(result):
            raise IdentityError(
                "not signed in (no account in the token cache, or its sign-in has expired)",
                retryable=True,  # the cache file is re-read on every attempt, so a later login is picked up
                hint=f"run `sidecar login --browser` (token cache: {self._client.cache.path})",
            )
        assert result is not None
        return requested_at, result

    async def login(self, *, browser: bool) -> str:
        return await super().login(browser=True)  # this flow is the browser sign-in, --browser or not
