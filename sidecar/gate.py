"""The request gate: which request targets may be forwarded, and whether the caller holds an inbound key.

The sidecar's one promise is that its token reaches the configured upstream and nothing else. The upstream
URL is built by appending the caller's raw target to `upstream.url`, so only an origin-form target
(`/path?query`, RFC 9112 §3.2.1) whose raw path starts with an allowed prefix may pass: an absolute-form
target (`http://evil/openai/...`, `work://x/...`) glued onto a port-less `upstream.url` would change its host,
and `//host/...` or a `..` segment would leave its base path. The raw prefix is matched to a route in
app.py (`route_of`); the transport checks the origin once more (sidecar/upstream.py) whatever built the URL.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from sidecar.tokens.base import bearer_token

_SEGMENT_SPLIT = re.compile(r"[/\\]")


def has_dot_dot(raw_path: str) -> bool:
    """True if any path segment is `..`, however it is percent-encoded (also doubly)."""
    path = raw_path.split("?", 1)[0]
    if ".." not in path and "%" not in path:
        return False  # the common case: no dots to hide and nothing encoded
    for _ in range(3):
        if ".." in _SEGMENT_SPLIT.split(path):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return ".." in _SEGMENT_SPLIT.split(path)


def target_problem(raw_target: str) -> tuple[str, str] | None:
    """Why this request target is refused with 400 (an error code and a message), or None if it is a plain
    origin-form target."""
    if not raw_target.startswith("/"):
        return (
            "InvalidRequestTarget",
            "only origin-form request targets (/path?query) are accepted; absolute-form, authority-form and "
            "asterisk-form targets are refused",
        )
    if raw_target.startswith(("//", "/\\")):
        return "InvalidRequestTarget", "a request target must not start with // (it would name another host)"
    if has_dot_dot(raw_target):
        return "InvalidPath", "path segments '..' are not allowed"
    return None


class InboundKeys:
    """The inbound api keys (`inbound.api_keys`), compared in constant time against every key."""

    def __init__(self, keys: Iterable[str], *, bearer_is_key: bool) -> None:
        self._keys = [key.encode() for key in keys]
        # The plain OpenAI client sends its api_key as a bearer token; on-behalf-of needs Authorization for
        # the user's own token, so there the key travels only in the api-key header.
        self._bearer_is_key = bearer_is_key

    def __bool__(self) -> bool:
        return bool(self._keys)

    def admit(self, headers: Mapping[str, str]) -> bool:
        given = self._presented(headers)
        # surrogateescape: a header that is not UTF-8 is compared as the bytes it was, never a 500
        candidate = given.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def _presented(self, headers: Mapping[str, str]) -> str:
        key = headers.get("api-key")
        if key is None and self._bearer_is_key:
            key = bearer_token(headers)
        return key or ""
