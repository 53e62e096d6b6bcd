"""The vocabulary every token flow shares: a token, the provider interface, and the one error type."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it stops (and should stop) being used. The token is kept out of repr."""

    token: str = field(repr=False)
    expires_on: float
    refresh_on: float | None = None

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_on - (time.time() if now is None else now)


class IdentityError(Exception):
    """The identity provider (or the local credential source) could not give us a token.

    `code` is the AADSTS code when the provider sent one, `retryable` says whether asking again can help
    (a wrong secret cannot; an outage can), `status` is what the proxy answers with.
    """

    def __init__(
        self,
        description: str,
        *,
        code: str | None = None,
        retryable: bool = True,
        status: int = 503,
        hint: str | None = None,
    ) -> None:
        self.description = description
        self.code = code
        self.retryable = retryable
        self.status = status
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.description.strip().splitlines()[0] if self.description.strip() else "unknown error"
        if self.code and self.code not in text:
            text = f"{self.code}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


@runtime_checkable
class TokenProvider(Protocol):
    """One token flow. It fetches a fresh token on every call and knows nothing of caching."""

    flow: str

    async def fetch(self) -> AccessToken: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class UserTokenProvider(Protocol):
    """A flow that exchanges the caller's own token (on-behalf-of) for one for the upstream."""

    flow: str

    async def fetch_for(self, user_assertion: str) -> AccessToken: ...

    async def aclose(self) -> None: ...


class Authorizer(Protocol):
    """What the proxy asks: the bearer token for this incoming request. It hides every flow and cache."""

    flow: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def is_ready(self) -> bool: ...

    async def token_for(self, headers: Mapping[str, str]) -> str: ...

    async def token_after_rejection(self, headers: Mapping[str, str], rejected: str) -> str | None:
        """The upstream said 401 to `rejected`: a newer token to replay the request with, or None, meaning
        "no new token now: answer the caller with the upstream's rejection". At most one identity-provider
        call per rejected token however many ask; tokens/manager.py also pauses these calls while the
        upstream rejects tokens fresh from the provider."""
        ...

    def seconds_until_expiry(self) -> float | None: ...
