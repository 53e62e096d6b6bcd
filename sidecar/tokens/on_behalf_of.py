"""On-behalf-of: the caller's own bearer token is exchanged (msal acquire_token_on_behalf_of) for a token for
the upstream, with the caller's identity.

Tokens here depend on the caller, so this flow is its own Authorizer: a bounded LRU of exchanged tokens keyed
by sha256(assertion) + scope, single-flight per user. Users never share an entry.

Callers are not trusted to spend the sidecar's identity-provider calls: their token is validated first
(sidecar/tokens/caller_token.py) and a bad one costs no exchange, no LRU slot and no readiness. Failures are
remembered per token for a few seconds, so a flood of the same bad token costs one validation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msal

from sidecar.config import NetworkConfig, OnBehalfOfAuth, Settings, TlsConfig
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, Authorizer, IdentityError, TokenObserver, bearer_token, mark_retrieved
from sidecar.tokens.manager import refresh_at

if TYPE_CHECKING:  # imported by build(): PyJWT loads cryptography (~9 MB), which other flows never need
    from sidecar.tokens.caller_token import CallerTokenValidator

log = logging.getLogger("sidecar.tokens")

# Errors that are about the caller's token, not about the sidecar: the caller gets 401 and must fix it.
_CALLER_ERRORS = {"invalid_grant", "interaction_required", "consent_required"}
# A failed token is answered from memory this long (its own sha256 is the key) ...
FAILURE_TTL = 5.0
# ... for at most this many tokens, oldest forgotten first: a flood of distinct bad tokens stays bounded.
FAILURE_CAPACITY = 4096
# A user whose freshly exchanged token the upstream rejected too gets no exchange triggered by a rejection
# for this long: the upstream refuses that user (a role, a policy), and exchanging again will not change it.
REJECTION_BACKOFF = 30.0
# After a failure of the sidecar's own credential, readiness is proven again in the background from this
# delay, doubling up to RECOVERY_MAX_DELAY: an unready pod gets no traffic, so it cannot wait for a caller.
RECOVERY_FIRST_DELAY = 5.0
RECOVERY_MAX_DELAY = 60.0


class _NoCache(msal.TokenCache):
    """msal would keep every user's tokens forever; the LRU below is the cache, so msal keeps none."""

    def add(self, event: dict[str, Any], now: Any = None) -> None:
        return None


class _Entry:
    """A successful exchange: only these take an LRU slot."""

    __slots__ = ("after_rejection", "quiet_until", "refresh_due", "token")

    def __init__(self, token: AccessToken, refresh_due: float, after_rejection: bool) -> None:
        self.token = token
        self.refresh_due = refresh_due
        self.after_rejection = after_rejection  # exchanged because the upstream rejected the previous token
        self.quiet_until = 0.0  # monotonic; set when this token, too, was rejected

    def fresh(self, now: float) -> bool:
        return now < self.refresh_due and self.token.usable(now)


class _Pending:
    """An exchange in flight for one caller token; everyone presenting that token waits for it."""

    __slots__ = ("after_rejection", "future", "task")

    def __init__(self, future: asyncio.Future[AccessToken]) -> None:
        self.future = future
        self.after_rejection = False
        self.task: asyncio.Task[None] | None = None


class OnBehalfOfAuthorizer(Authorizer):
    flow = "on_behalf_of"
    takes_caller_bearer = True

    def __init__(
        self,
        auth: OnBehalfOfAuth,
        tls: TlsConfig,
        *,
        validator: CallerTokenValidator,
        observer: TokenObserver | None = None,
        network: NetworkConfig | None = None,
    ) -> None:
        self._scope = auth.scope
        self._client_id = auth.client_id
        self._margin = auth.refresh_margin
        self._capacity = auth.obo_cache_size
        self._app = _msal.ConfidentialApp(auth, tls, token_cache=_NoCache(), network=network)
        self._validator = validator
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._failures: OrderedDict[str, tuple[float, IdentityError]] = OrderedDict()
        self._observer = observer
        self._exchange_error: IdentityError | None = None  # the sidecar's own, never a caller's
        self._recovery: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._validator.start()

    async def aclose(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()
            if pending.task is not None:
                pending.task.cancel()
        self._pending.clear()
        self._entries.clear()
        self._failures.clear()
        await self._validator.aclose()
        self._app.close()

    @property
    def last_error(self) -> IdentityError | None:
        """The sidecar's own failure (its credential, the identity provider, the tenant's keys), if any."""
        return self._validator.last_error or self._exchange_error

    def is_ready(self) -> bool:
        # There is no token to hold before a caller arrives; ready unless the sidecar itself cannot work.
        # A caller's bad token is that caller's 401, never the whole pod's readiness.
        return self.last_error is None

    def _key(self, assertion: str) -> str:
        return hashlib.sha256(f"{self._scope}\0{assertion}".encode()).hexdigest()

    async def token_for(self, headers: Mapping[str, str]) -> str:
        assertion = bearer_token(headers)
        if assertion is None:
            raise IdentityError(
                "no user token: on-behalf-of needs the caller's own token in `Authorization: Bearer <token>`",
                code="MissingUserToken",
                retryable=False,
                status=401,
            )
        key = self._key(assertion)
        entry = self._entries.get(key)
        if entry is not None and entry.fresh(time.time()):
            # validated when it was exchanged, and an entry never outlives the caller's token
            self._entries.move_to_end(key)
            return entry.token.token
        return (await self._exchange(key, assertion, after_rejection=False)).token

    async def token_after_rejection(self, headers: Mapping[str, str], rejected: str) -> str | None:
        """The upstream said 401 to `rejected`: a newer token to replay with, or None when there is none to be
        had now (answer the caller with the upstream's rejection). At most one exchange per held token is
        triggered by a rejection; a freshly exchanged token rejected too means no such exchange for this
        caller for REJECTION_BACKOFF."""
        assertion = bearer_token(headers)
        if assertion is None:  # pragma: no cover - token_for already refused this request
            return None
        key = self._key(assertion)
        entry = self._entries.get(key)
        if entry is not None and key not in self._pending:
            now = time.monotonic()
            if entry.token.token != rejected:
                if entry.fresh(time.time()):
                    return entry.token.token  # someone already replaced the rejected token
            elif entry.after_rejection:
                if entry.quiet_until == 0.0:
                    entry.quiet_until = now + REJECTION_BACKOFF
                    log.info(
                        "the upstream rejected a freshly exchanged token too; no new exchange for this caller "
                        "for %.0f s",
                        REJECTION_BACKOFF,
                    )
                if now < entry.quiet_until:
                    return None
        return (await self._exchange(key, assertion, after_rejection=True)).token

    async def _exchange(self, key: str, assertion: str, *, after_rejection: bool) -> AccessToken:
        pending = self._pending.get(key)
        if pending is None:
            failed = self._failures.get(key)
            if failed is not None:
                if time.monotonic() < failed[0]:
                    raise failed[1]
                del self._failures[key]
            pending = self._pending[key] = _Pending(asyncio.get_running_loop().create_future())
            pending.task = asyncio.create_task(self._fetch_into(key, assertion, pending))
            pending.task.add_done_callback(mark_retrieved)
        if after_rejection:
            pending.after_rejection = True  # whatever this exchange brings counts as the rejection's re-exchange
        return await asyncio.shield(pending.future)

    async def _fetch_into(self, key: str, assertion: str, pending: _Pending) -> None:
        issued_at = time.time()
        started: float | None = None  # set once the identity provider is asked
        try:
            claims = await self._validator.claims(assertion)
            started = time.monotonic()
            requested_at, result = await _msal.call_msal(self._acquire, assertion)
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
            if started is not None:
                self._observe("failure", time.monotonic() - started)
                if error.status != 401:
                    log.warning("on-behalf-of exchange failed: %s", error.one_line())
                    self._own_failure(error)
            self._entries.pop(key, None)  # an entry past its refresh point is of no use to this caller now
            self._remember_failure(key, error)
            if not pending.future.done():
                pending.future.set_exception(error)
        else:
            self._exchange_error = None
            # Never serve the caller's session longer than the caller's own token lasts: once that has
            # expired the next request is validated again, and refused.
            refresh_due = min(refresh_at(token, self._margin, issued_at), float(claims["exp"]))
            self._store(key, _Entry(token, refresh_due, pending.after_rejection))
            assert started is not None
            self._observe("success", time.monotonic() - started)
            if not pending.future.done():
                pending.future.set_result(token)
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]

    def _own_failure(self, error: IdentityError) -> None:
        self._exchange_error = error
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="on-behalf-of-readiness")

    async def _recover(self) -> None:
        """Prove the sidecar's credential again with an app-only token (one identity-provider call per
        attempt, backing off) until it works or a caller's exchange succeeds: then the pod is ready again."""
        delay = RECOVERY_FIRST_DELAY
        while self._exchange_error is not None:
            await asyncio.sleep(delay)
            if self._exchange_error is None:
                return
            try:
                await self.check()
            except IdentityError as exc:
                log.info("on-behalf-of credential still failing: %s", exc.one_line())
                delay = min(delay * 2, RECOVERY_MAX_DELAY)
            else:
                log.info("on-behalf-of credential works again; ready")
                self._exchange_error = None

    def _store(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def _remember_failure(self, key: str, error: IdentityError) -> None:
        now = time.monotonic()
        failures = self._failures
        failures[key] = (now + FAILURE_TTL, error)
        failures.move_to_end(key)
        # one TTL for all, so the oldest are first: drop the expired ones, then any beyond capacity
        while failures and (len(failures) > FAILURE_CAPACITY or next(iter(failures.values()))[0] <= now):
            failures.popitem(last=False)

    def _acquire(self, assertion: str) -> tuple[float, dict[str, Any]]:
        app = self._app.get()
        requested_at = time.time()
        return requested_at, app.acquire_token_on_behalf_of(user_assertion=assertion, scopes=[self._scope])

    async def check(self) -> tuple[str, str | None]:
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
        requested_at = time.time()
        return requested_at, app.acquire_token_for_client(scopes=[f"{self._client_id}/.default"])


def build(settings: Settings, observer: TokenObserver | None = None) -> Authorizer:
    from sidecar.tokens.caller_token import CallerTokenValidator

    auth = settings.auth
    assert isinstance(auth, OnBehalfOfAuth)
    return OnBehalfOfAuthorizer(
        auth,
        settings.tls,
        validator=CallerTokenValidator(auth, settings.tls, network=settings.network),
        observer=observer,
        network=settings.network,
    )
