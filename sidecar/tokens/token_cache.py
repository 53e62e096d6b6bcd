"""msal's token cache persisted to one file: mode 0600, written atomically, re-read when another process
(`sidecar login`) changed it."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import msal


class PersistentTokenCache(msal.SerializableTokenCache):
    """A SerializableTokenCache bound to a file. Call `reload()` before and `save()` after each msal call."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._mtime: float | None = None
        self._io = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Pick up the file if it changed since we last read or wrote it (e.g. `sidecar login` ran)."""
        with self._io:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                if self._mtime is not None:
                    # `sidecar logout` removed it: forget the sign-in here too
                    self.deserialize("")
                    self._mtime = None
                return
            if self._mtime == stat.st_mtime:
                return
            self.deserialize(self.path.read_text(encoding="utf-8"))
            self._mtime = stat.st_mtime

    def save(self) -> None:
        with self._io:
            if not self.has_state_changed:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            descriptor, temporary = tempfile.mkstemp(prefix=".token-cache-", dir=self.path.parent)
            try:
                os.fchmod(descriptor, 0o600)  # refresh tokens are credentials: owner only
                with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                    handle.write(self.serialize())
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            self.has_state_changed = False
            self._mtime = self.path.stat().st_mtime

    def clear_file(self) -> bool:
        with self._io:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            self._mtime = None
            return True
