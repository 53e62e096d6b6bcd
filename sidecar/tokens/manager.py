"""TokenManager: the one cache, refresh and identity-provider protection policy for every flow.

It holds the current token, refreshes it in the background before it expires (at the provider's
refresh-on hint or `expires_on - refresh_margin`, a little earlier by jitter), lets one call reach the
identity provider however many requests wait (single-flight), keeps serving a still-valid token while the
provider is down, and retries with capped exponential backoff in a loop that never dies.

Entra throttles a whole application when one client floods it, so every way to the provider is bounded:
- two fetches start at least `RetryPolicy.min_interval` apart, whoever asks for them;
- a token that arrives with no usable life left is refused as a failure (the host clock is off, or the
  provider sent no lifetime), so the loop backs off instead of fetching it again and again;
- a token the upstream rejects (401) is replaced at most once, however many requests saw it rejected;
- when the replacement is rejected too, the upstream refuses what the provider issues (wrong audience or
  app role) and asking again cannot help: `token_after_rejection` says None (the caller gets the upstream's
  401) for `rejection_pause` seconds, doubling up to `max_rejection_pause` while it goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.claims import unverified_claims
from sidecar.tokens.base import (
    EXPIRY_SKEW,
    AccessToken,
    Authorizer,
    IdentityError,
    TokenObserver,
    TokenProvider,
    mark_retrieved,
    usable,
)

log = logging.getLogger("sidecar.tokens")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard the manager may lean on the identity provider (seconds)."""

    first_delay: float = 1.0  # the backoff after a failure, times `factor` per failure up to max_delay
    max_delay: float = 30.0
    factor: float = 2.0
    min_interval: float = 1.0  # between the starts of any two fetches
    rejection_pause: float = 30.0  # no refresh for a rejection once a fresh token was rejected too ...
    max_rejection_pause: float = 240.0  # ... doubling up to this while the upstream keeps rejecting them

    def delay(self, failures: int) -> float:
        base = min(self.max_delay, self.first_delay * self.factor ** max(0, failures - 1))
        return base * random.uniform(0.8, 1.0)

    def next_pause(self, previous: float) -> float:
        """The rejection pause after one of `previous` seconds (0: the first)."""
        return min(self.max_rejection_pause, previous * 2) if previous > 0 else self.rejection_pause


def refuse_if_expired(token: AccessToken) -> AccessToken:
    """A token with no usable life on arrival is an error, not a token: holding it would make the refresh
    loop fetch again at once, forever. Its lower bound is EXPIRY_SKEW: shorter tokens could never be injected;
    longer ones are legitimate in tests (seconds-long lifetimes) and the fetch floor bounds their cost."""
    now = time.time()
    if token.usable(now):
        return token
    raise IdentityError(
        f"the identity provider's token {'expired' if token.expires_on <= now else 'expires'} at "
        f"{_utc(token.expires_on)} and the local time is {_utc(now)}: it is not used",
        retryable=True,
        hint="check the host clock (NTP sync); or the identity provider sent no lifetime (expires_in)",
    )


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def refresh_at(token: AccessToken, margin: float, issued_at: float) -> float:
    """When to replace `token`: the provider's hint, else expiry minus margin; never later than 80 % of
    its life and never before half of it when the margin is larger than the lifetime."""
    lifetime = max(0.0, token.expires_on - issued_at)
    by_margin = token.expires_on - margin
    if by_margin <= issued_at + lifetime * 0.5:
        by_margin = issued_at + lifetime * 0.5
    when = min(by_margin, token.refresh_on) if token.refresh_on else by_margin
    jitter = random.uniform(0.0, min(30.0, lifetime * 0.05))
    return max(issued_at, when - jitter)


class TokenManager(Authorizer):
    """Caches one provider's token for every request (the flows where all requests share a token)."""

    def __init__(
        self,
        provider: TokenProvider,
        *,
        refresh_margin: float = 300.0,
        retry: RetryPolicy | None = None,
        observer: TokenObserver | None = None,
    ) -> None:
        self.provider = provider
        self.flow = provider.flow
        self._margin = refresh_margin
        self._retry = retry or RetryPolicy()
        self._observer = observer
        self._current: AccessToken | None = None
        self._refresh_due = 0.0
        self._last_error: IdentityError | None = None
        self._failures = 0
        self._next_attempt = 0.0  # no on-demand attempt before this (negative cache while the IdP is down)
        self._inflight: asyncio.Future[AccessToken] | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_fetch = -math.inf  # when the last fetch started (monotonic): the floor counts from it
        # What the rejection policy remembers. Tokens are compared by value: the proxy hands back the string.
        self._refreshed_for: str | None = None  # the last rejected token that cost a fetch
        self._replacement: str | None = None  # the token that fetch gave ...
        self._replaced_at = -math.inf  # ... and when (monotonic): it is "fresh" for rejection_pause seconds
        self._pause = 0.0  # the length of the last rejection pause
        self._paused_until = -math.inf  # no fetch for a rejection before this (monotonic)

    # -- the proxy's side -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin fetching the first token in the background; requests that arrive first wait for it."""
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._refresh_loop(), name=f"token-refresh-{self.flow}")

    async def aclose(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._fetch_task is not None and not self._fetch_task.done():
            # a fetch still running would outlive the provider (its HTTP session closed under it)
            self._fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetch_task
        await self.provider.aclose()

    async def token_for(self, headers: Mapping[str, str] | None = None) -> str:
        current = self._current
        if current is not None and current.usable():
            return current.token  # the hot path: no awaits, no thread hop
        return (await self.get()).token

    async def check(self) -> tuple[str, str | None]:
        """A token straight from the provider, waiting as long as it takes (`sidecar check` may be a person
        signing in with a device code), and without touching the cache."""
        return (await self.provider.fetch()).token, None

    async def token_after_rejection(self, headers: Mapping[str, str] | None, rejected: str) -> str | None:
        """The upstream answered 401 to `rejected`: a newer token to replay with, or None for "no new token
        now, give the caller the upstream's answer" (see replacement_for)."""
        token = await self.replacement_for(rejected)
        return None if token is None else token.token

    async def replacement_for(self, rejected: str) -> AccessToken | None:
        """A token to use instead of `rejected`, or None: no new token now.

        In order: a valid newer token is held already (free); within a rejection pause, None; the held token
        has expired meanwhile, a token as for any request; a fetch in flight is joined (free); the replacement
        itself rejected while fresh starts a pause (None); else one fetch for this token, never a second."""
        current = self._current
        if current is not None and current.token != rejected and current.usable():
            return current  # someone already replaced the rejected token: it costs nothing
        if time.monotonic() < self._paused_until:
            return None
        if current is None or current.token != rejected:
            return await self.get()  # the held token is no longer valid: a new one is needed anyway
        if self._inflight is None:
            if rejected == self._replacement and time.monotonic() - self._replaced_at < self._retry.rejection_pause:
                self._pause_rejections(rejected)
                return None
            if rejected == self._refreshed_for:
                # Its one fetch failed (the refresh loop retries with backoff) or gave the same token back.
                if self._last_error is not None:
                    raise self._last_error
                return None
            if self._last_error is not None and time.monotonic() < self._next_attempt:
                raise self._last_error  # the provider failed moments ago
        self._refreshed_for = rejected
        token = await self._refresh_once(self.provider.max_wait)  # joins a fetch in flight: one for every caller
        if token.token == rejected:
            return None
        self._replacement, self._replaced_at = token.token, time.monotonic()
        return token

    def _pause_rejections(self, rejected: str) -> None:
        """A fresh token was rejected: the upstream refuses what the provider issues; stop asking for a while."""
        now = time.monotonic()
        # the pause grows while the upstream keeps rejecting: each pause starts soon after the last one ended
        self._pause = self._retry.next_pause(
            self._pause if now - self._paused_until < self._retry.max_rejection_pause else 0.0
        )
        self._paused_until = now + self._pause
        self._replacement = None  # after the pause, one more fetch for the next rejection
        audience = unverified_claims(rejected).get("aud")
        log.warning(
            "the upstream rejects tokens fresh from the identity provider%s: no new token for a rejection for "
            "%.3g s (callers get the upstream's 401). Check that auth.scope names the upstream's Application ID "
            "URI and that the identity has the app role the upstream requires",
            f" (audience {audience!r})" if audience else "",
            self._pause,
        )

    async def get(self) -> AccessToken:
        """A valid token: the cached one, or a fresh one if none is valid (single-flight)."""
        current = self._current
        if current is not None and current.usable():
            return current
        if self._inflight is None and time.monotonic() < self._next_attempt and self._last_error is not None:
            raise self._last_error  # the provider failed moments ago; don't hammer it once per request
        return await self._refresh_once(self.provider.max_wait)

    # -- refreshing -----------------------------------------------------------------------------------

    async def _refresh_once(self, max_wait: float | None = None) -> AccessToken:
        """Join the refresh in flight, or start one. Every waiter gets the same token or the same error."""
        inflight = self._inflight
        if inflight is None:
            inflight = self._inflight = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._fetch_into(inflight), name=f"token-fetch-{self.flow}")
            task.add_done_callback(mark_retrieved)
            self._fetch_task = task
        if max_wait is None:
            return await asyncio.shield(inflight)
        try:
            return await asyncio.wait_for(asyncio.shield(inflight), timeout=max_wait or 0.01)
        except TimeoutError:
            raise IdentityError(self.provider.pending_message, retryable=True) from None

    async def _fetch_into(self, future: asyncio.Future[AccessToken]) -> None:
        """One fetch for everyone waiting on `future`, started no sooner than the floor allows."""
        try:
            floor = self._last_fetch + self._retry.min_interval - time.monotonic()
            if floor > 0:
                await asyncio.sleep(floor)  # waiters keep joining this fetch meanwhile
            self._last_fetch = started = time.monotonic()
            issued_at = time.time()
            try:
                token = refuse_if_expired(await self.provider.fetch())
            except IdentityError as exc:
                error = exc
            except Exception as exc:  # a provider bug must not kill the refresh loop; say what happened
                log.exception("token flow %s failed unexpectedly", self.flow)
                error = IdentityError(f"{type(exc).__name__}: {exc}", retryable=True)
            else:
                self._accept(token, issued_at, started)
                if not future.done():
                    future.set_result(token)
                return
            self._record_failure(error, started)
            if not future.done():
                future.set_exception(error)
        finally:
            if self._inflight is future:
                self._inflight = None
            self._wake.set()

    def _accept(self, token: AccessToken, issued_at: float, started: float) -> None:
        self._current = token
        self._refresh_due = refresh_at(token, self._margin, issued_at)
        self._last_error = None
        self._failures = 0
        self._next_attempt = 0.0
        self._observe("success", time.monotonic() - started)
        log.info(
            "token acquired (flow=%s, expires in %.0f s, next refresh in %.0f s)",
            self.flow,
            token.seconds_left(),
            self._refresh_due - time.time(),
        )

    def _record_failure(self, error: IdentityError, started: float) -> None:
        self._last_error = error
        self._failures += 1
        self._next_attempt = time.monotonic() + min(self._retry.delay(self._failures), 5.0)
        self._observe("failure", time.monotonic() - started)
        still = usable(self._current)
        log.warning(
            "token request failed (flow=%s, attempt %d): %s%s",
            self.flow,
            self._failures,
            error.one_line(),
            "; still serving the current token" if still else "",
        )

    async def _refresh_loop(self) -> None:
        """Fetch now, then sleep until the refresh is due or a fetch fails; never exits on errors."""
        while True:
            try:
                await self._refresh_once()
            except IdentityError:
                pass  # logged in _record_failure; the delay below is the backoff
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - defensive: the loop must never die
                log.exception("unexpected error in the token refresh loop")
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        while True:
            if self._last_error is not None and self._failures:
                delay = self._retry.delay(self._failures)
                current = self._current
                if current is not None and current.usable():
                    # don't sleep past the current token's expiry without one more try
                    delay = min(delay, max(0.0, current.seconds_left() - EXPIRY_SKEW))
            else:
                delay = self._refresh_due - time.time()
            if delay <= 0:
                return
            self._wake.clear()
            try:
                # an on-demand refresh (401 replay, cold request) wakes us to recompute the schedule.
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation (aclose) that
                # arrives just as the wake-up does, and the loop slept on for the whole refresh interval.
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                return
