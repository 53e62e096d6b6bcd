"""Client credentials (a service principal with a secret, a secret file or a certificate) through msal."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msal

from sidecar.config import ClientCredentialsAuth, ConfidentialClientAuth, Settings, TlsConfig, read_secret_file
from sidecar.tokens import _msal
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider


def load_certificate(path: Path, password: str | None) -> dict[str, Any]:
    """A PEM with a private key and a certificate -> msal's client_credential dict."""
    # Imported here, not at the top: cryptography's native library is ~8 MB of resident memory that a
    # secret-based sidecar never needs (msal loads it lazily too).
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
        certificate = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"auth.certificate_path {str(path)!r}: needs a PEM with the private key and the certificate ({exc})",
            retryable=False,
        ) from None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    # With public_certificate and no thumbprint, msal signs with the certificate's SHA-256 thumbprint.
    return {"private_key": key_pem, "public_certificate": certificate.public_bytes(serialization.Encoding.PEM).decode()}


def read_client_credential(auth: ConfidentialClientAuth) -> str | dict[str, Any]:
    """The credential as msal takes it, read afresh so a rotated secret file or certificate is picked up."""
    if auth.client_secret is not None:
        return auth.client_secret.get_secret_value()
    if auth.client_secret_file is not None:
        try:
            secret = read_secret_file(auth.client_secret_file)
        except OSError as exc:
            raise IdentityError(f"cannot read auth.client_secret_file: {exc.strerror}", retryable=True) from None
        if not secret:
            raise IdentityError("auth.client_secret_file is empty", retryable=True)
        return secret
    if auth.certificate_path is not None:
        password = auth.certificate_password.get_secret_value() if auth.certificate_password else None
        try:
            return load_certificate(auth.certificate_path, password)
        except OSError as exc:
            raise IdentityError(f"cannot read auth.certificate_path: {exc.strerror}", retryable=True) from None
    raise IdentityError("no client credential configured", retryable=False)


def _fingerprint(credential: str | dict[str, Any]) -> str:
    material = credential if isinstance(credential, str) else credential["private_key"]
    return hashlib.sha256(material.encode()).hexdigest()


class ConfidentialApp:
    """One msal ConfidentialClientApplication, rebuilt when the credential behind it changes."""

    def __init__(
        self, auth: ConfidentialClientAuth, tls: TlsConfig, token_cache: msal.TokenCache | None = None
    ) -> None:
        self._auth = auth
        self._tls = tls
        self._token_cache = token_cache
        self._app: msal.ConfidentialClientApplication | None = None
        self._fingerprint = ""

    def get(self) -> msal.ConfidentialClientApplication:
        """Called in a worker thread: reading files and building the app are blocking."""
        credential = read_client_credential(self._auth)
        fingerprint = _fingerprint(credential)
        if self._app is None or fingerprint != self._fingerprint:
            self._app = msal.ConfidentialClientApplication(
                client_id=self._auth.client_id,
                client_credential=credential,
                token_cache=self._token_cache,
                **_msal.msal_options(self._auth, self._tls),
            )
            self._fingerprint = fingerprint
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.http_client.close()


class ClientCredentialsProvider(TokenProvider):
    flow = "client_credentials"

    def __init__(self, auth: ClientCredentialsAuth, tls: TlsConfig) -> None:
        self._scopes = [auth.scope]
        self._app = ConfidentialApp(auth, tls)

    def _acquire(self) -> tuple[float, dict[str, Any]]:
        app = self._app.get()
        # The manager decides when a token is stale; msal's own cache would hand back the old one.
        app.remove_tokens_for_client()
        requested_at = _msal.now()
        return requested_at, app.acquire_token_for_client(scopes=self._scopes)

    async def fetch(self) -> AccessToken:
        requested_at, result = await _msal.call_msal(self._acquire)
        return _msal.token_from_result(result, requested_at)

    async def aclose(self) -> None:
        self._app.close()

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientCredentialsProvider:
        assert isinstance(settings.auth, ClientCredentialsAuth)
        return cls(settings.auth, settings.tls)
