"""The request gate: which request targets may be forwarded, and whether the caller holds an inbound key.

The sidecar's one promise is that its token reaches the configured upstream and nothing else. The upstream
URL is built by appending the caller's raw target to `upstream.url`, so only an origin-form target
(`/path?query`, RFC 9112 §3.2.1) whose raw path starts with an allowed prefix may pass: an absolute-form
target (`http://evil/openai/...`, `work://x/...`) glued onto a port-less `upstream.url` would change its host,
and `//host/...` or a `..` segment would leave its base path. The raw prefix is matched to a route in
app.py (`route_of`); the transport checks the origin once more (sidecar/upstream.py) whatever built the URL.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote

from sidecar.config import ConfigError
from sidecar.config.sections import KEY_FILE_FIX, read_key_file
from sidecar.tokens.base import bearer_token

log = logging.getLogger("sidecar")

# How often the key file is looked at (a stat; a read only when it changed): new keys count within a second or so.
RECHECK_SECONDS = 1.0
_Identity = tuple[int, ...]

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
    """The inbound api keys (`inbound.api_keys` and those in `inbound.api_keys_file`), compared in constant time
    against every key. The file is looked at by `watch`, a task beside the requests: a request only reads the
    list it finds, never the file."""

    def __init__(self, keys: Iterable[str], *, bearer_is_key: bool, key_file: Path | None = None) -> None:
        self._fixed = [key.encode() for key in keys]
        self._file = KeyFile(key_file) if key_file is not None else None
        self._keys = self._fixed + (self._file.keys if self._file is not None else [])
        # The plain OpenAI client sends its api_key as a bearer token; on-behalf-of needs Authorization for
        # the user's own token, so there the key travels only in the api-key header.
        self._bearer_is_key = bearer_is_key

    def __bool__(self) -> bool:
        # a key file always demands a key: whatever happens to the file later, the gate never opens
        return self._file is not None or bool(self._keys)

    def admit(self, headers: Mapping[str, str]) -> bool:
        given = self._presented(headers)
        # surrogateescape: a header that is not UTF-8 is compared as the bytes it was, never a 500
        candidate = given.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def refresh(self) -> None:
        """Take the key file's keys again if it changed (and still holds keys)."""
        if self._file is not None and self._file.reload():
            self._keys = self._fixed + self._file.keys

    async def watch(self, every: float = RECHECK_SECONDS) -> None:
        """Refresh every `every` seconds for the app's lifetime (it is cancelled at the end); without a file, return."""
        while self._file is not None:
            await asyncio.sleep(every)
            try:
                self.refresh()
            except Exception:  # never seen; if it were, rotation must not stop for good with one bad look
                log.exception("inbound.api_keys_file: looking at %s failed", self._file.path)

    def _presented(self, headers: Mapping[str, str]) -> str:
        key = headers.get("api-key")
        if key is None and self._bearer_is_key:
            key = bearer_token(headers)
        return key or ""


class KeyFile:
    """The keys of an `inbound.api_keys_file`, read again when the file changes, so keys rotate without a restart.

    Kubernetes updates a mounted Secret by swapping a symlink, and tools replace files by renaming: the file is
    known by what `os.stat` says of the path (device, inode, size, mtime), not by its mtime alone. A file that
    becomes unreadable or empty (mid-rotation, a mistake) keeps the last keys that were read: an empty set must
    never mean "no key needed". Read on the event loop: a stat a second, and a small read when it changed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._identity()  # before the read: a change during it is seen at the next look
        keys, problem = read_key_file(path)
        if problem is not None:  # it held keys when the config was loaded; now, as the app is built, it does not
            raise ConfigError([f"inbound.api_keys_file: {problem}; {KEY_FILE_FIX}"])
        self.keys = [key.encode() for key in keys]
        log.info("inbound.api_keys_file %s: %d keys loaded", path, len(keys))

    def reload(self) -> bool:
        """Whether new keys were read (they are in `keys`): only when the file changed and holds keys."""
        identity = self._identity()
        if identity == self._seen:
            return False
        self._seen = identity
        keys, problem = read_key_file(self.path)
        if problem is not None:  # one warning per change of the file, not one per look
            log.warning(
                "inbound.api_keys_file: %s; keeping the %d keys read before until it holds keys again (a "
                "missing or empty file never turns the key check off)",
                problem,
                len(self.keys),
            )
            return False
        self.keys = [key.encode() for key in keys]
        log.info("inbound.api_keys_file %s changed: %d keys loaded", self.path, len(keys))
        return True

    def _identity(self) -> _Identity:
        try:
            stat = os.stat(self.path)  # follows the symlink: a swapped target is another inode
        except OSError as exc:
            return (exc.errno or 0,)
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
