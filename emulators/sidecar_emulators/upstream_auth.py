"""Bearer token validation as App Service authentication does it in front of the upstream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from multidict import CIMultiDictProxy

from sidecar_emulators.keys import JwksSource, resolve_jwks, verify_jwt


@dataclass(frozen=True)
class AuthOutcome:
    status: int  # 200 when valid
    claims: dict[str, Any] | None
    reason: str  # for logs and test failure messages


class BearerValidator:
    def __init__(
        self,
        *,
        jwks: JwksSource,
        issuers: Sequence[str],
        audiences: Sequence[str],
        clock_skew: float = 0,
    ) -> None:
        self._jwks = jwks
        self._issuers = list(issuers)
        self._audiences = list(audiences)
        self._clock_skew = clock_skew

    def check(self, headers: CIMultiDictProxy[str]) -> AuthOutcome:
        values = headers.getall("Authorization", [])
        if len(values) > 1:
            return AuthOutcome(400, None, "more than one Authorization header")
        if not values:
            return AuthOutcome(401, None, "no Authorization header")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthOutcome(401, None, "not a bearer token")
        try:
            claims = verify_jwt(
                token.strip(),
                resolve_jwks(self._jwks),
                audience=self._audiences,
                issuer=self._issuers,
                leeway=self._clock_skew,
            )
        except jwt.PyJWTError as exc:
            return AuthOutcome(401, None, f"{type(exc).__name__}: {exc}")
        return AuthOutcome(200, claims, "ok")
