"""A route's backends and which one to use next: priority first, round-robin within a priority, and a backend
that answered 429/503 (or could not be reached) cooled down for as long as it asked.

Throttling is the most common production failure with Azure OpenAI; the usual answer is several deployments
behind a balancer that honours `retry-after-ms` / `x-ms-retry-after-ms` / `Retry-After`. The proxy asks
`pick()` for a backend, reports what happened with `cool()`, and retries once on the next one when it may.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from sidecar.upstream import Pool, Send, UpstreamError

# When a 429/503 says nothing usable about how long to wait, and when a backend cannot be reached at all.
DEFAULT_THROTTLE_COOLDOWN = 10.0
DEFAULT_UNREACHABLE_COOLDOWN = 5.0
MAX_COOLDOWN = 300.0  # a backend asking for longer is asked again after this: a typo must not take it out for a day
THROTTLED = frozenset({429, 503})


@dataclass(eq=False, slots=True)
class Backend:
    name: str  # the configured name, or the index: a bounded metrics label
    url: str
    priority: int
    pool: Pool | None = None  # created when the app starts (it needs a loop)
    send: Send | None = None  # pool.request, inside a client span when tracing is on (sidecar/telemetry.py)
    cooling_until: float = 0.0  # monotonic
    _turns: int = field(default=0, repr=False)

    def cooling(self, now: float) -> float:
        """Seconds left to cool down (0 when usable)."""
        return max(0.0, self.cooling_until - now)


class AllCooling(UpstreamError):
    """Every backend of the route is cooling down: the caller gets 429 with the smallest wait."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"every backend is throttled or unreachable for {wait:.1f} s more")
        self.wait = wait


class Backends:
    """One route's backends. Everything runs on the event loop's thread: no locks.

    With one backend there is nothing to fail over to: it is never cooled, and its own 429 reaches the caller.
    """

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.all = list(backends)
        self._by_priority = sorted(self.all, key=lambda backend: backend.priority)
        self._turn = 0
        self.failover = len(self.all) > 1

    def pick(self, exclude: Iterable[Backend] = ()) -> Backend | None:
        """The next usable backend: the best priority with one not cooling, round-robin among its equals."""
        if not self.failover and not exclude:
            return self.all[0]  # the common route: one backend, never cooled; no lists built per request
        now = time.monotonic()
        skipped = set(map(id, exclude))
        usable = [b for b in self._by_priority if b.cooling_until <= now and id(b) not in skipped]
        if not usable:
            return None
        best = [b for b in usable if b.priority == usable[0].priority]
        self._turn += 1
        return best[self._turn % len(best)]

    def smallest_wait(self) -> float:
        """How long until some backend is usable again (all cooling)."""
        now = time.monotonic()
        return min((backend.cooling(now) for backend in self.all), default=0.0)

    @staticmethod
    def cool(backend: Backend, seconds: float) -> None:
        backend.cooling_until = max(backend.cooling_until, time.monotonic() + min(seconds, MAX_COOLDOWN))


def retry_after(headers: Iterable[tuple[str, str]]) -> float | None:
    """Seconds the answer asks to wait: `retry-after-ms`, `x-ms-retry-after-ms` (milliseconds) win over
    `Retry-After` (seconds or an HTTP date). None when absent or nonsensical (negative, not a number, NaN)."""
    milliseconds: float | None = None
    seconds: float | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in ("retry-after-ms", "x-ms-retry-after-ms"):
            milliseconds = _number(value)
        elif lower == "retry-after":
            seconds = _number(value)
            if seconds is None:
                seconds = _seconds_until(value)
    if milliseconds is not None:
        return milliseconds / 1000
    return seconds


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _seconds_until(http_date: str) -> float | None:
    try:
        when = parsedate_to_datetime(http_date.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())
