"""The sign-in cache of device_code and interactive: msal's token cache persisted with msal-extensions.

- Encrypted where the platform offers it (libsecret on a Linux desktop, the Keychain on macOS, DPAPI on
  Windows); where it does not (headless Linux, containers) a plain file of mode 0600 in a folder of mode 0700.
  Which of the two is said once in the log, when the sign-in flow first uses the cache (`describe`).
- Every write takes msal-extensions' cross-process lock (`<cache>.lockfile` beside it), so `sidecar login` and a
  running `serve` never write over each other, and every read picks up what another process wrote: a running
  `serve` renews from a later `sidecar login` without a restart.
- `sidecar logout` removes the sign-in (`clear`); a running `serve` then forgets it too (`forget_if_removed`).
"""

from __future__ import annotations

from pathlib import Path

from msal_extensions import (
    CrossPlatLock,
    FilePersistence,
    KeychainPersistence,
    LibsecretPersistence,
    PersistedTokenCache,
    build_encrypted_persistence,
)
from msal_extensions.persistence import BasePersistence

_ENCRYPTION = {LibsecretPersistence: "libsecret", KeychainPersistence: "the macOS Keychain"}


class PersistentTokenCache(PersistedTokenCache):
    """msal's token cache kept at `path` (encrypted, or a 0600 file), shared with other processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # refresh tokens are credentials: owner only
        self.path = path
        self._lock_path = f"{path}.lockfile"
        self._persistence, self._plain_because = _persistence(path)
        super().__init__(self._persistence, lock_location=self._lock_path)

    def describe(self) -> str:
        """Where and how the sign-in is kept, for the log."""
        if self._plain_because is None:
            store = _ENCRYPTION.get(type(self._persistence), "DPAPI")
            return f"sign-in cache {self.path}: encrypted with {store}"
        return (
            f"sign-in cache {self.path}: a plain file of mode 0600, no encryption available here "
            f"({self._plain_because})"
        )

    def forget_if_removed(self) -> None:
        """msal-extensions keeps what it last read when the file is gone; after `sidecar logout` removed it, a
        running `serve` must not go on renewing that sign-in from memory. Blocking (a stat)."""
        if not self.path.exists():
            self.deserialize("")

    def clear(self) -> bool:
        """Remove the saved sign-in (`sidecar logout`); False when there was none. An encrypted store's content
        is erased too (its file only signals changes). Needs no msal app, so it works offline."""
        with CrossPlatLock(self._lock_path):
            if not self.path.exists():
                return False
            if self._persistence.is_encrypted:
                self._persistence.save("")
            self.path.unlink(missing_ok=True)
        self.deserialize("")
        return True


def _persistence(path: Path) -> tuple[BasePersistence, str | None]:
    """The encrypted store when the platform has one, else the plain file and why there is no encryption."""
    try:
        return build_encrypted_persistence(str(path)), None
    except Exception as exc:  # ImportError (no PyGObject), RuntimeError (no keyring service, headless), ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return FilePersistence(str(path)), reason
