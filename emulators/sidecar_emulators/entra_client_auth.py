"""Client authentication at the token endpoint: secrets, certificate assertions, federated assertions."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sidecar_emulators import aadsts
from sidecar_emulators.entra_directory import ClientApp, Directory
from sidecar_emulators.keys import SigningKey

JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"

# msal 1.39 signs certificate assertions PS256 (x5t#S256 header) when it can compute the SHA-256
# thumbprint from public_certificate, RS256 (x5t header) when only a SHA-1 thumbprint is given.
_ASSERTION_ALGORITHMS = ("RS256", "PS256")


@dataclass(frozen=True)
class ClientAuthResult:
    client: ClientApp
    # Entra's azpacr: 0 public client, 1 secret, 2 certificate or federated assertion.
    azpacr: str


def basic_auth_credentials(authorization: str | None) -> tuple[str, str] | None:
    """client_secret_basic (RFC 6749 2.3.1): both parts are form-urlencoded before base64."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, _, secret = decoded.partition(":")
    return unquote_plus(client_id), unquote_plus(secret)


class ClientAuthenticator:
    def __init__(self, directory: Directory, *, tenant_id: str, federated_key: Callable[[], SigningKey]) -> None:
        self._directory = directory
        self._tenant_id = tenant_id
        self._federated_key = federated_key

    def authenticate(
        self,
        form: Mapping[str, str],
        *,
        authorization: str | None,
        assertion_audiences: Collection[str],
    ) -> ClientAuthResult:
        basic = basic_auth_credentials(authorization)
        client_id = form.get("client_id") or (basic[0] if basic else "")
        if not client_id:
            raise aadsts.missing_parameter("client_id")
        client = self._directory.clients.get(client_id)
        if client is None:
            raise aadsts.unknown_client(client_id, self._tenant_id)

        secret = form.get("client_secret") or (basic[1] if basic else None)
        assertion = form.get("client_assertion")
        if client.public:
            if secret or assertion:
                raise aadsts.public_client_with_credential()
            return ClientAuthResult(client, "0")
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION_TYPE:
                raise aadsts.missing_parameter("client_assertion_type")
            self._verify_assertion(client, assertion, assertion_audiences)
            return ClientAuthResult(client, "2")
        if secret is not None:
            if client.secret is None or not hmac.compare_digest(secret.encode(), client.secret.encode()):
                raise aadsts.invalid_client_secret(client.client_id)
            return ClientAuthResult(client, "1")
        raise aadsts.missing_client_credential()

    # ---- assertions ----

    def _verify_assertion(self, client: ClientApp, assertion: str, audiences: Collection[str]) -> None:
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as exc:
            raise aadsts.assertion_invalid(str(exc)) from exc
        issuer = unverified.get("iss")
        federated_issuers = {f.issuer for f in self._directory.federations}
        if issuer != client.client_id and issuer in federated_issuers:
            self._verify_federated(client, assertion, issuer)
        elif issuer != client.client_id and not client.certificates:
            raise aadsts.federated_issuer_unknown(str(issuer))
        else:
            self._verify_certificate(client, assertion, header, audiences)

    def _verify_certificate(
        self, client: ClientApp, assertion: str, header: Mapping[str, Any], audiences: Collection[str]
    ) -> None:
        algorithm = header.get("alg")
        if algorithm not in _ASSERTION_ALGORITHMS:
            raise aadsts.assertion_invalid(f"Unsupported signing algorithm {algorithm!r}.")
        certificate = _certificate_for_header(client, header)
        try:
            claims = jwt.decode(
                assertion,
                certificate.public_key(),  # type: ignore[arg-type]
                algorithms=[algorithm],
                audience=list(audiences),
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise aadsts.assertion_expired() from exc
        except jwt.InvalidSignatureError as exc:
            raise aadsts.assertion_bad_signature() from exc
        except jwt.InvalidAudienceError as exc:
            raise aadsts.assertion_invalid(f"The audience is not one of {sorted(audiences)}.") from exc
        except jwt.PyJWTError as exc:
            raise aadsts.assertion_invalid(str(exc)) from exc
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            raise aadsts.assertion_client_mismatch()

    def _verify_federated(self, client: ClientApp, assertion: str, issuer: str) -> None:
        try:
            claims = jwt.decode(
                assertion,
                self._federated_key().public_key,
                algorithms=["RS256"],
                options={"require": ["exp", "iss", "sub", "aud"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise aadsts.assertion_expired() from exc
        except jwt.InvalidSignatureError as exc:
            raise aadsts.assertion_bad_signature() from exc
        except jwt.PyJWTError as exc:
            raise aadsts.assertion_invalid(str(exc)) from exc
        audience = claims["aud"]
        audiences = audience if isinstance(audience, list) else [audience]
        if FEDERATED_AUDIENCE not in audiences:
            raise aadsts.federated_audience_mismatch(audience)
        for_client = {f for f in self._directory.federations if f.client_id == client.client_id}
        if not any(f.issuer == issuer for f in for_client):
            raise aadsts.federated_issuer_unknown(issuer)
        subject = claims["sub"]
        if not any(f.issuer == issuer and f.subject == subject for f in for_client):
            raise aadsts.federated_subject_mismatch(issuer, subject, audience)


def _certificate_for_header(client: ClientApp, header: Mapping[str, Any]) -> x509.Certificate:
    """Find the registered certificate named by the assertion's x5t#S256 or x5t header."""
    for name, algorithm in (("x5t#S256", hashes.SHA256()), ("x5t", hashes.SHA1())):  # noqa: S303
        value = header.get(name)
        if not value:
            continue
        try:
            thumbprint = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError) as exc:
            raise aadsts.assertion_invalid(f"Malformed {name} header.") from exc
        for certificate in client.certificates:
            if certificate.fingerprint(algorithm) == thumbprint:
                return certificate
        raise aadsts.assertion_cert_not_registered(client.client_id, thumbprint.hex().upper())
    raise aadsts.assertion_invalid("The client assertion has neither an x5t nor an x5t#S256 header.")
