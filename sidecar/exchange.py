"""What one proxied request records (for the access log and the metrics) and the memory all of them may hold."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

# A body this small is kept in memory so the request can be replayed once after an upstream 401.
REPLAYABLE_BODY = 1024 * 1024


@dataclass(slots=True)
class Exchange:
    """What the access log and the metrics want to know about one proxied request."""

    started: float = field(default_factory=time.monotonic)
    route: str = "other"
    upstream_status: int | None = None
    backend: str | None = None  # the name of the backend that answered (the last one tried)
    ttfb: float | None = None  # seconds from sending upstream to its response head
    bytes_in: int = 0
    bytes_out: int = 0
    # The upstream's ids for this exchange (what Microsoft support asks for): apim-request-id, x-request-id, region
    upstream_ids: tuple[str | None, str | None, str | None] = (None, None, None)
    # The status of a response whose every byte was handed to the caller's connection: what is recorded even
    # if the caller hangs up before the last chunk terminator (the openai SDK does, right after [DONE]).
    delivered: int | None = None


EXCHANGE = web.RequestKey("exchange", Exchange)


class ReplayBudget:
    """The bytes all requests together may hold in memory for a 401 replay. Past it a request streams without
    replay, so callers waiting for a token (or a slow upstream) cannot pile up memory."""

    __slots__ = ("_left",)

    def __init__(self, total: int) -> None:
        self._left = total

    def take(self, size: int) -> bool:
        if size > self._left:
            return False
        self._left -= size
        return True

    def give(self, size: int) -> None:
        self._left += size


def upstream_ids(headers: list[tuple[str, str]]) -> tuple[str | None, str | None, str | None]:
    apim = request_id = region = None
    for name, value in headers:
        lower = name.lower()
        if lower == "apim-request-id":
            apim = value
        elif lower == "x-request-id":
            request_id = value
        elif lower == "x-ms-region":
            region = value
    return apim, request_id, region
