"""RSA signing keys published as a JWKS, and the verifier side of that JWKS."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# What a verifier is given: a JWKS document, or a callable returning the current one
# (so a verifier follows key rotation without being rebuilt).
JwksSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SigningKey:
    """One RS256 key with a stable ``kid`` (derived from the public key, like a thumbprint)."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None) -> None:
        self.private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = b64url(hashlib.sha1(der).digest())  # noqa: S324 - an identifier, as Entra's x5t

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def sign(self, claims: Mapping[str, Any], *, typ: str = "JWT") -> str:
        # Entra puts both kid and x5t (same value) in the header; some verifiers look at x5t.
        headers = {"typ": typ, "kid": self.kid, "x5t": self.kid}
        return jwt.encode(dict(claims), self.private_key, algorithm="RS256", headers=headers)

    def jwk(self, **extra: str) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.public_key))
        jwk.update(kid=self.kid, x5t=self.kid, use="sig", alg="RS256", **extra)
        return jwk


def resolve_jwks(source: JwksSource) -> Mapping[str, Any]:
    return source() if callable(source) else source


def verify_jwt(
    token: str,
    jwks: Mapping[str, Any],
    *,
    audience: str | list[str] | None,
    issuer: str | list[str] | None,
    leeway: float = 0,
) -> dict[str, Any]:
    """Verify an RS256 JWT against a JWKS; raises ``jwt.PyJWTError`` on any problem."""
    kid = jwt.get_unverified_header(token).get("kid")
    for key in jwks.get("keys", ()):
        if key.get("kid") == kid:
            public_key = jwt.PyJWK.from_dict(dict(key), algorithm="RS256").key
            break
    else:
        raise jwt.InvalidKeyError(f"no key with kid {kid!r}")
    options = {"require": ["exp", "iat"], "verify_aud": audience is not None}
    claims: dict[str, Any] = jwt.decode(
        token,
        public_key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        leeway=leeway,
        options=options,  # type: ignore[arg-type]
    )
    return claims
