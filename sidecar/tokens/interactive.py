"""interactive: authorization code + PKCE in the system browser (`sidecar login --browser`). `serve` only renews
silently: a server cannot open a browser for someone, so no saved sign-in is an error that says what to run."""

from __future__ import annotations

from sidecar.config import InteractiveAuth, Settings
from sidecar.tokens._signin import Answer, SignInProvider
from sidecar.tokens.base import IdentityError, TokenProvider


class InteractiveProvider(SignInProvider):
    flow = "interactive"
    pending_message = "not signed in yet: run `sidecar login --browser`"

    def _acquire(self) -> Answer:
        signed_in = self._client.silent()
        if signed_in is None:
            raise IdentityError(
                "not signed in (no account in the token cache, or its sign-in has expired)",
                retryable=True,  # the cache file is re-read on every attempt, so a later login is picked up
                hint=f"run `sidecar login --browser` (token cache: {self.cache_path})",
            )
        return signed_in

    async def login(self, *, browser: bool) -> str:
        return await super().login(browser=True)  # this flow is the browser sign-in, --browser or not


def build(settings: Settings) -> TokenProvider:
    assert isinstance(settings.auth, InteractiveAuth)
    return InteractiveProvider(settings.auth, settings.tls, settings.network)
