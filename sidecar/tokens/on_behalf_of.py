"""On-behalf-of: the caller's own bearer token is exchanged (msal acquire_token_on_behalf_of) for a token for
the upstream, with the caller's identity.

Tokens here depend on the caller, so this flow is its own Authorizer: a bounded LRU of exchanged tokens keyed
by sha256(assertion) + scope, single-flight per user. Users never share an entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msal

from sidecar.config import AuthConfig, Settings, TlsConfig
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, IdentityError
from sidecar.tokens.claims import unverified_claims
from sidecar.tokens.client_credentials import ConfidentialApp
from sidecar.tokens.manager import EXPIRY_SKEW, TokenObserver, refresh_at

# Errors that are about the caller's token, not about the sidecar: the caller gets 401 and must fix it.
_CALLER_ERRORS = {"invalid_grant", "interaction_required", "consent_required"}


class _NoCache(msal.TokenCache):
    """msal would keep every user's tokens forever; the LRU below is the cache, so msal keeps none."""

    def add(self, event: dict[str, Any], now: Any = None) -> None:
        return None


class _Entry:
    __slots__ = ("inflight", "refresh_due", "token")

    def __init__(self) -> None:
        self.token: AccessToken | None = None
        self.refresh_due = 0.0
        self.inflight: asyncio.Future[AccessToken] | None = None

    def fresh(self, now: float) -> bool:
        token = self.token
        return token is not None and now < self.refresh_due and token.expires_on - now > EXPIRY_SKEW


def bearer_of(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization") or ""
    if value[:7].lower() != "bearer ":
        return None
    token = value[7:].strip()
    return token or None


class OnBehalfOfAuthorizer:
    flow = "on_behalf_of"

    def __init__(
        self,
        auth: AuthConfig,
        tls: TlsConfig,
        *,
        observer: TokenObserver | None = None,
    ) -> None:
        self._scope = auth.scope
        self._client_id = auth.client_id
        self._margin = auth.refresh_margin
        self._capacity = auth.obo_cache_size
        self._app = ConfidentialApp(auth, tls, token_cache=_NoCache())
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._observer = observer
        self.exchanges = 0  # identity-provider calls made, for `sidecar check` and tests
        self.last_error: IdentityError | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OnBehalfOfAuthorizer:
        return cls(settings.auth, settings.tls)

    def set_observer(self, observer: TokenObserver | None) -> None:
        self._observer = observer

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        for entry in self._entries.values():
            if entry.inflight is not None and not entry.inflight.done():
                entry.inflight.cancel()
        self._entries.clear()
        self._app.close()

    def is_ready(self) -> bool:
        # There is no token to hold before a caller arrives; ready unless the sidecar's own credential failed.
        return self.last_error is None or self.last_error.status == 401

    def seconds_until_expiry(self) -> float | None:
        return None

    def _key(self, assertion: str) -> str:
        return hashlib.sha256(f"{self._scope}\0{assertion}".encode()).hexdigest()

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    async def token_for(self, headers: Mapping[str, str]) -> str:
        assertion = bearer_of(headers)
        if assertion is None:
            raise IdentityError(
                "no user token: on-behalf-of needs the caller's own token in `Authorization: Bearer <token>`",
                code="MissingUserToken",
                retryable=False,
                status=401,
            )
        entry = self._entry(self._key(assertion))
        if entry.fresh(time.time()):
            assert entry.token is not None
            return entry.token.token
        return (await self._exchange(entry, assertion)).token

    async def token_after_rejection(self, headers: Mapping[str, str], rejected: str) -> str:
        assertion = bearer_of(headers)
        if assertion is None:  # pragma: no cover - token_for already refused this request
            raise IdentityError("no user token", code="MissingUserToken", retryable=False, status=401)
        entry = self._entry(self._key(assertion))
        if entry.token is not None and entry.token.token != rejected:
            return entry.token.token
        return (await self._exchange(entry, assertion)).token

    async def _exchange(self, entry: _Entry, assertion: str) -> AccessToken:
        if entry.inflight is None:
            entry.inflight = asyncio.get_running_loop().create_future()
            asyncio.create_task(self._fetch_into(entry, assertion, entry.inflight)).add_done_callback(_consume)
        return await asyncio.shield(entry.inflight)

    async def _fetch_into(self, entry: _Entry, assertion: str, future: asyncio.Future[AccessToken]) -> None:
        started = time.monotonic()
        issued_at = time.time()
        try:
            requested_at, result = await _msal.call_msal(self._acquire, assertion)
            self.exchanges += 1
            if "access_token" not in result:
                caller_error = result.get("error") in _CALLER_ERRORS
                error = _msal.error_from_result(result, status=401 if caller_error else 503)
                if caller_error:
                    error.retryable = False  # the same token will be refused again: the client must get a new one
                raise error
            token = _msal.token_from_result(result, requested_at)
        except Exception as exc:
            # every waiter must get an answer: an error msal raises (a 5xx from the IdP) is an IdentityError too
            error = exc if isinstance(exc, IdentityError) else IdentityError(f"{type(exc).__name__}: {exc}")
            self.last_error = error
            self._observe("failure", started)
            if not future.done():
                future.set_exception(error)
        else:
            self.last_error = None
            entry.token = token
            # Never serve the caller's session longer than the caller's own token lasts: once that has
            # expired the next request exchanges it again, and the IdP says AADSTS500133 (401 to the caller).
            entry.refresh_due = min(refresh_at(token, self._margin, issued_at), _expiry_of(assertion))
            self._observe("success", started)
            if not future.done():
                future.set_result(token)
        finally:
            entry.inflight = None

    def _acquire(self, assertion: str) -> tuple[float, dict[str, Any]]:
        app = self._app.get()
        requested_at = _msal.now()
        return requested_at, app.acquire_token_on_behalf_of(user_assertion=assertion, scopes=[self._scope])

    async def verify_client(self) -> tuple[str, str]:
        """For `sidecar check`, which has no caller token to exchange: prove that the confidential client
        (tenant, client id, secret or certificate) is accepted, with an app-only token for the app itself
        (`<client_id>/.default`), which needs no API permission. Returns the token and what was verified."""
        requested_at, result = await _msal.call_msal(self._app_only_token)
        token = _msal.token_from_result(result, requested_at)
        note = (
            f"{self.flow} exchanges each caller's token, and `check` has no caller: no exchange was tried. "
            f"Verified the confidential client instead with an app-only token for the app itself "
            f"({self._client_id}/.default); requests must bring a user token whose audience is this app."
        )
        return token.token, note

    def _app_only_token(self) -> tuple[float, dict[str, Any]]:
        app = self._app.get()
        requested_at = _msal.now()
        return requested_at, app.acquire_token_for_client(scopes=[f"{self._client_id}/.default"])

    def _observe(self, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer(self.flow, outcome, time.monotonic() - started)


def _expiry_of(assertion: str) -> float:
    """The caller's token's exp claim (unverified: the IdP verifies it; this only bounds our cache)."""
    exp = unverified_claims(assertion).get("exp")
    return float(exp) if isinstance(exp, int | float) else float("inf")


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
