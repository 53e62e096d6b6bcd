"""Mint Entra-shaped v2.0 access tokens, id tokens and token responses."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar_emulators.entra_directory import User
from sidecar_emulators.keys import SigningKey, b64url


def _uti() -> str:
    # Entra's uti is 22 base64url characters; uniqueness is what matters.
    return b64url(uuid.uuid4().bytes)


def client_info(oid: str, tenant_id: str) -> str:
    """msal builds the account's home_account_id from this (``uid.utid``)."""
    raw = json.dumps({"uid": oid, "utid": tenant_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class TokenMinter:
    """Signs tokens with the tenant key and remembers the claims of every access token."""

    def __init__(self, key: SigningKey, *, issuer: str, tenant_id: str, lifetime: float) -> None:
        self.key = key
        self.issuer = issuer
        self.tenant_id = tenant_id
        self.lifetime = lifetime
        self.issued: list[dict[str, Any]] = []

    def _times(self, lifetime: float | None, expired: bool = False) -> dict[str, int]:
        if not self.issuer:
            # The issuer contains the bound port, known only once the server listens.
            raise RuntimeError("start the Entra emulator before issuing tokens")
        now = int(time.time())
        life = self.lifetime if lifetime is None else lifetime
        if expired:
            # Valid once, an hour ago: what an expired token a client replays looks like.
            return {"iat": now - 3600 - int(life), "nbf": now - 3600 - int(life), "exp": now - 3600}
        return {"iat": now, "nbf": now, "exp": int(now + life)}

    def access_token(self, claims: Mapping[str, Any]) -> str:
        self.issued.append(dict(claims))
        return self.key.sign(claims)

    def app_claims(
        self,
        *,
        client_id: str,
        oid: str,
        audience: str,
        roles: Sequence[str],
        azpacr: str = "1",
        extra: Mapping[str, Any] | None = None,
        lifetime: float | None = None,
    ) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            **self._times(lifetime),
            "azp": client_id,
            "azpacr": azpacr,
            "appid": client_id,
            "idtyp": "app",
            "oid": oid,
            "sub": oid,
            "tid": self.tenant_id,
            "uti": _uti(),
            "jti": str(uuid.uuid4()),
            "ver": "2.0",
        }
        if roles:
            claims["roles"] = list(roles)
        claims.update(extra or {})
        return claims

    def user_claims(
        self,
        *,
        user: User,
        client_id: str,
        audience: str,
        scp: str,
        azpacr: str = "0",
        lifetime: float | None = None,
        expired: bool = False,
    ) -> dict[str, Any]:
        return {
            "aud": audience,
            "iss": self.issuer,
            **self._times(lifetime, expired),
            "azp": client_id,
            "azpacr": azpacr,
            "appid": client_id,
            "idtyp": "user",
            "name": user.name,
            "oid": user.oid,
            "preferred_username": user.username,
            "scp": scp,
            # Entra's sub is pairwise (per app); derive it so it differs from oid like the real one.
            "sub": _pairwise_sub(user.oid, client_id),
            "tid": self.tenant_id,
            "uti": _uti(),
            "jti": str(uuid.uuid4()),
            "ver": "2.0",
        }

    def id_token(self, *, user: User, client_id: str, nonce: str | None) -> str:
        claims: dict[str, Any] = {
            "aud": client_id,
            "iss": self.issuer,
            **self._times(None),
            "name": user.name,
            "oid": user.oid,
            "preferred_username": user.username,
            "sub": _pairwise_sub(user.oid, client_id),
            "tid": self.tenant_id,
            "uti": _uti(),
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        return self.key.sign(claims)

    def app_response(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        expires_in = max(0, int(claims["exp"]) - int(claims["iat"]))
        return {
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": self.access_token(claims),
        }


def _pairwise_sub(oid: str, client_id: str) -> str:
    return b64url(hashlib.sha256(f"{oid}|{client_id}".encode()).digest())
