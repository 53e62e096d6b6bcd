"""What the upstream emulator records, and the one-shot behaviours tests can script."""

from __future__ import annotations

import gzip as gzip_module
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path_qs: str  # raw path + query exactly as received (aiohttp's request.raw_path)
    headers: CIMultiDict[str]  # a copy; duplicates preserved
    body: bytes  # raw bytes as received (no transfer/content decoding)
    body_sha256: str
    body_size: int
    claims: dict[str, Any] | None  # verified token claims, None when authentication failed
    received_at: float  # time.monotonic()


@dataclass
class Scripted:
    """A one-shot behaviour for the next request whose path contains ``match`` (any, if None).

    Precedence: ``hang`` > ``redirect_to`` > SSE (``sse_events`` or ``reset_after_bytes``) > plain.
    ``reset_after_bytes`` without ``sse_events`` streams the normal chat completion and aborts the
    TCP connection after that many bytes of the SSE body. ``sse_events`` items: dicts/str become
    ``data: ...`` events, bytes are written verbatim; no ``[DONE]`` is added for you.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    gzip: bool = False
    redirect_to: str | None = None
    reset_after_bytes: int | None = None
    hang: bool = False
    sse_events: Sequence[str | bytes | Mapping[str, Any]] | None = None
    match: str | None = None
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.match is None or self.match in path) and (self.method is None or self.method == method)

    @property
    def wire_body(self) -> bytes:
        """The bytes sent; ``mtime=0`` makes the gzip output reproducible for tests."""
        return gzip_module.compress(self.body, mtime=0) if self.gzip else self.body

    # ---- common cases ----

    @classmethod
    def unauthorized(cls, **kwargs: Any) -> Scripted:
        return cls(status=401, **kwargs)

    @classmethod
    def rate_limited(
        cls,
        retry_after: float = 1,
        *,
        remaining_requests: int = 0,
        remaining_tokens: int = 0,
        **kwargs: Any,
    ) -> Scripted:
        """429 with the headers Azure OpenAI sends (seconds, and milliseconds in retry-after-ms)."""
        headers = {
            "Retry-After": str(max(0, round(retry_after))),
            "retry-after-ms": str(int(retry_after * 1000)),
            "x-ratelimit-remaining-requests": str(remaining_requests),
            "x-ratelimit-remaining-tokens": str(remaining_tokens),
            "Content-Type": "application/json",
        }
        body = json.dumps(
            {
                "error": {
                    "code": "429",
                    "message": "Requests to the ChatCompletions_Create Operation have exceeded the call rate "
                    f"limit. Please retry after {max(0, round(retry_after))} seconds.",
                }
            }
        ).encode()
        return cls(status=429, headers=headers, body=body, **kwargs)

    @classmethod
    def gzip_json(cls, payload: Any, *, status: int = 200, **kwargs: Any) -> Scripted:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return cls(status=status, headers=headers, body=body, gzip=True, **kwargs)

    @classmethod
    def redirect(cls, url: str, *, status: int = 307, **kwargs: Any) -> Scripted:
        return cls(status=status, redirect_to=url, **kwargs)

    @classmethod
    def stream_reset(cls, after_bytes: int, **kwargs: Any) -> Scripted:
        return cls(reset_after_bytes=after_bytes, **kwargs)
