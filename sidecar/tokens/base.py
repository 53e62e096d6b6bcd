"""The vocabulary every token flow shares: a token, the one error type, and every interface the rest of the
sidecar uses on a flow, declared here with all its members (nothing is looked up with getattr)."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("sidecar.tokens")

# A token this close to expiry is never injected: it could expire on its way to the upstream.
EXPIRY_SKEW = 1.0


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it stops (and should stop) being used. The token is kept out of repr."""

    token: str = field(repr=False)
    expires_on: float
    refresh_on: float | None = None

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_on - (time.time() if now is None else now)

    def usable(self, now: float | None = None) -> bool:
        """Valid for at least EXPIRY_SKEW more seconds: the only tokens ever injected."""
        return self.seconds_left(now) > EXPIRY_SKEW


def usable(token: AccessToken | None) -> bool:
    return token is not None and token.usable()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token in the caller's `Authorization: Bearer <token>`, if that is what the header holds."""
    value = headers.get("Authorization") or ""
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """Done callback for a task or future whose answer nobody may await (its callers were cancelled, or nobody
    asked): retrieving its exception keeps asyncio from logging "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


class IdentityError(Exception):
    """The identity provider (or the local credential source) could not give us a token.

    `code` is the AADSTS code when the provider sent one, `retryable` says whether asking again can help
    (a wrong secret cannot; an outage can), `status` is what the proxy answers with.
    """

    def __init__(
        self,
        description: str,
        *,
        code: str | None = None,
        retryable: bool = True,
        status: int = 503,
        hint: str | None = None,
    ) -> None:
        self.description = description
        self.code = code
        self.retryable = retryable
        self.status = status
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.description.strip().splitlines()[0] if self.description.strip() else "unknown error"
        if self.code and self.code not in text:
            text = f"{self.code}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


# Told of every identity-provider call: (flow, outcome "success" or "failure", seconds it took). Given to an
# authorizer when it is built (the app's metrics; a worker parent's broker).
TokenObserver = Callable[[str, str, float], None]


class TokenProvider(ABC):
    """One flow whose token every request shares. It fetches a fresh token on every call and knows nothing of
    caching: the TokenManager (tokens/manager.py) caches, refreshes and protects the identity provider."""

    flow: str
    # What a request hears when it waited `max_wait` for the fetch in flight and still has no token.
    pending_message = "still waiting for the identity provider"

    @property
    def max_wait(self) -> float:
        """How long a request may wait for the fetch in flight. Read on every wait: a sign-in flow says 0 while
        a person is signing in (that may take minutes), not while it renews silently."""
        return 30.0

    @abstractmethod
    async def fetch(self) -> AccessToken: ...

    async def aclose(self) -> None:
        """Release what the flow holds (HTTP clients, a fetch still running at shutdown)."""
        return None  # nothing by default


@runtime_checkable
class SignIn(Protocol):
    """A flow where a person signs in ahead of time: what `sidecar login` and `sidecar logout` use."""

    @property
    def cache_path(self) -> str:
        """Where the sign-in is kept (for messages)."""
        ...

    async def login(self, *, browser: bool) -> str:
        """Sign a person in, in the foreground (`browser`: in the system browser, else with a device code);
        returns the signed-in user's name."""
        ...

    async def logout(self) -> bool:
        """Remove the saved sign-in; False when there was none."""
        ...

    async def aclose(self) -> None: ...


class Authorizer(ABC):
    """What the proxy asks: the bearer token for this incoming request. It hides every flow and cache.

    The defaults suit an authorizer that holds one token for every request in `_current` (and its last failure in
    `_last_error`); one whose tokens depend on the caller overrides what they say."""

    flow: str
    # The caller's own `Authorization: Bearer` token is this authorizer's input (its tokens depend on the caller):
    # then that header is no inbound api key (sidecar/gate.py), and commands without a caller get no token here.
    takes_caller_bearer = False
    _current: AccessToken | None = None
    _last_error: IdentityError | None = None
    _observer: TokenObserver | None = None

    async def start(self) -> None:
        """Begin the background work (the first token, signing keys); requests that arrive first wait for it."""
        return None  # nothing by default

    async def aclose(self) -> None:
        """Stop the background work and release what the authorizer holds."""
        return None  # nothing by default

    @abstractmethod
    async def token_for(self, headers: Mapping[str, str]) -> str: ...

    @abstractmethod
    async def token_after_rejection(self, headers: Mapping[str, str], rejected: str) -> str | None:
        """The upstream said 401 to `rejected`: a newer token to replay the request with, or None, meaning
        "no new token now: answer the caller with the upstream's rejection". At most one identity-provider
        call per rejected token however many ask; tokens/manager.py also pauses these calls while the
        upstream rejects tokens fresh from the provider."""

    @property
    def current(self) -> AccessToken | None:
        """The token every request gets now, valid or not (None before the first, and when tokens are per caller)."""
        return self._current

    @property
    def last_error(self) -> IdentityError | None:
        """The failure that keeps the sidecar from serving (what /readyz says), if any."""
        return self._last_error

    def is_ready(self) -> bool:
        return usable(self._current)

    def seconds_until_expiry(self) -> float | None:
        return None if self._current is None else self._current.seconds_left()

    async def check(self) -> tuple[str, str | None]:
        """For `sidecar check` and `sidecar token`, which have no caller: one token, and a note saying what was
        verified when the token is not the kind requests get (None when it is)."""
        return await self.token_for({}), None

    def _observe(self, outcome: str, seconds: float) -> None:
        """Tell the observer of an identity-provider call ("success" or "failure") that took `seconds`."""
        if self._observer is None:
            return
        try:
            self._observer(self.flow, outcome, seconds)
        except Exception:  # counting calls must never break getting tokens
            log.exception("token observer failed")
