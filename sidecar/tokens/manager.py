"""TokenManager: the one cache and refresh policy for every flow.

It holds the current token, refreshes it in the background before it expires (at the provider's
refresh-on hint or `expires_on - refresh_margin`, a little earlier by jitter), lets one call reach the
identity provider however many requests wait (single-flight), keeps serving a still-valid token while the
provider is down, and retries with capped exponential backoff in a loop that never dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider

log = logging.getLogger("sidecar.tokens")

# A token this close to expiry is never injected: it could expire on its way to the upstream.
EXPIRY_SKEW = 1.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        base = min(self.max_delay, self.first_delay * self.factor ** max(0, failures - 1))
        return base * random.uniform(0.8, 1.0)


def usable(token: AccessToken | None) -> bool:
    """Valid for at least EXPIRY_SKEW more seconds: the only tokens ever injected."""
    return token is not None and token.expires_on - time.time() > EXPIRY_SKEW


class HeldToken:
    """The token an authorizer holds and the last error, with the questions the app asks about them.

    Shared by the TokenManager and the workers' ChannelAuthorizer (sidecar/token_channel.py)."""

    _current: AccessToken | None = None
    _last_error: IdentityError | None = None

    def is_ready(self) -> bool:
        return usable(self._current)

    def seconds_until_expiry(self) -> float | None:
        return None if self._current is None else self._current.seconds_left()

    @property
    def last_error(self) -> IdentityError | None:
        return self._last_error


TokenObserver = Callable[[str, str, float], None]  # (flow, outcome, seconds spent)


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


class TokenManager(HeldToken):
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
        self._listeners: list[Callable[[AccessToken], None]] = []

    def add_listener(self, listener: Callable[[AccessToken], None]) -> None:
        """Call `listener` with every new token (worker processes get theirs pushed this way)."""
        self._listeners.append(listener)

    @property
    def current(self) -> AccessToken | None:
        """The cached token, valid or not (None before the first one)."""
        return self._current

    @property
    def _max_wait(self) -> float:
        """How long a request may wait for a fetch in flight. Read on every wait: a sign-in flow says 0 only
        while a person is signing in (that may take minutes), not while it renews silently."""
        return float(getattr(self.provider, "max_wait", 30.0))

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
        if current is not None and current.expires_on - time.time() > EXPIRY_SKEW:
            return current.token  # the hot path: no awaits, no thread hop
        return (await self.get()).token

    async def token_after_rejection(self, headers: Mapping[str, str] | None, rejected: str) -> str:
        current = self._current
        if current is not None and current.token != rejected and usable(current):
            return current.token  # someone already replaced the rejected token
        return (await self._refresh_once(self._max_wait)).token

    async def get(self) -> AccessToken:
        """A valid token: the cached one, or a fresh one if none is valid (single-flight)."""
        current = self._current
        if usable(current):
            assert current is not None
            return current
        if self._inflight is None and time.monotonic() < self._next_attempt and self._last_error is not None:
            raise self._last_error  # the provider failed moments ago; don't hammer it once per request
        return await self._refresh_once(self._max_wait)

    # -- refreshing -----------------------------------------------------------------------------------

    async def _refresh_once(self, max_wait: float | None = None) -> AccessToken:
        """Join the refresh in flight, or start one. Every waiter gets the same token or the same error."""
        inflight = self._inflight
        if inflight is None:
            inflight = self._inflight = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._fetch_into(inflight), name=f"token-fetch-{self.flow}")
            task.add_done_callback(_consume)
            self._fetch_task = task
        if max_wait is None:
            return await asyncio.shield(inflight)
        try:
            return await asyncio.wait_for(asyncio.shield(inflight), timeout=max_wait or 0.01)
        except TimeoutError:
            pending = getattr(self.provider, "pending_message", "still waiting for the identity provider")
            raise IdentityError(pending, retryable=True) from None

    async def _fetch_into(self, future: asyncio.Future[AccessToken]) -> None:
        started = time.monotonic()
        issued_at = time.time()
        try:
            token = await self.provider.fetch()
        except IdentityError as exc:
            self._record_failure(exc, started)
            if not future.done():
                future.set_exception(exc)
        except Exception as exc:  # a provider bug must not kill the refresh loop; say what happened
            log.exception("token flow %s failed unexpectedly", self.flow)
            error = IdentityError(f"{type(exc).__name__}: {exc}", retryable=True)
            self._record_failure(error, started)
            if not future.done():
                future.set_exception(error)
        else:
            self._current = token
            self._refresh_due = refresh_at(token, self._margin, issued_at)
            self._last_error = None
            self._failures = 0
            self._next_attempt = 0.0
            self._observe("success", started)
            log.info(
                "token acquired (flow=%s, expires in %.0f s, next refresh in %.0f s)",
                self.flow,
                token.seconds_left(),
                self._refresh_due - time.time(),
            )
            for listener in self._listeners:
                try:
                    listener(token)
                except Exception:  # a listener must not break the refresh
                    log.exception("token listener failed")
            if not future.done():
                future.set_result(token)
        finally:
            if self._inflight is future:
                self._inflight = None
            self._wake.set()

    def _record_failure(self, error: IdentityError, started: float) -> None:
        self._last_error = error
        self._failures += 1
        self._next_attempt = time.monotonic() + min(self._retry.delay(self._failures), 5.0)
        self._observe("failure", started)
        still = self._current is not None and usable(self._current)
        log.warning(
            "token request failed (flow=%s, attempt %d): %s%s",
            self.flow,
            self._failures,
            error.one_line(),
            "; still serving the current token" if still else "",
        )

    def _observe(self, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer(self.flow, outcome, time.monotonic() - started)

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
                if self._current is not None and usable(self._current):
                    # don't sleep past the current token's expiry without one more try
                    delay = min(delay, max(0.0, self._current.seconds_left() - EXPIRY_SKEW))
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


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
