"""The msal adapter every msal-based flow shares: the authority and the HTTP client, the confidential client
app (client_credentials, on_behalf_of), running msal's blocking calls, and turning its answers into tokens or
IdentityErrors that carry the AADSTS code. The AADSTS code and its hints serve azure-identity's errors too."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msal
import requests
from msal_extensions import LockError

from sidecar.config import ConfidentialClientAuth, EntraAppAuth, NetworkConfig, TlsConfig, read_secret_file
from sidecar.tls import PinnedCASession
from sidecar.tokens.base import AccessToken, IdentityError

T = TypeVar("T")

# What to tell the operator for the codes they will meet most; the provider's text comes first anyway.
HINTS = {
    "AADSTS7000215": "auth.client_secret is wrong: use the secret's Value, not its Secret ID",
    "AADSTS7000222": "the client secret has expired: create a new one and update auth.client_secret",
    "AADSTS700016": "check auth.client_id and auth.tenant_id: the application is not in that tenant",
    "AADSTS90002": "check auth.tenant_id: the tenant was not found",
    "AADSTS500011": "check auth.scope: the API's Application ID URI is not known in this tenant",
    "AADSTS700027": "the certificate is not registered on the app: upload it under Certificates & secrets",
    "AADSTS500133": "the caller's token has expired: the client must get a new one",
    "AADSTS65001": "the user or an admin has not consented to the API's scope",
    "AADSTS7000218": "the app is a public client: enable 'Allow public client flows' or use a secret",
}
_NOT_RETRYABLE = {"invalid_client", "unauthorized_client", "invalid_scope", "invalid_request", "invalid_resource"}
_CODE = re.compile(r"\bAADSTS\d+\b")


def aadsts_code(text: str) -> str | None:
    """The first AADSTS code in an error text, if any."""
    match = _CODE.search(text)
    return match.group(0) if match else None


def authority_url(auth: EntraAppAuth) -> str:
    return f"{auth.authority_host}/{auth.tenant_id}"


def msal_options(auth: EntraAppAuth, tls: TlsConfig, network: NetworkConfig | None = None) -> dict[str, Any]:
    """Keyword arguments every msal application gets: authority, discovery and our pinned HTTP client."""
    return {
        "authority": authority_url(auth),
        # Instance discovery asks login.microsoftonline.com about the host: useless off the public cloud
        # (sovereign clouds, ADFS-like hosts, the local emulator) and it would fail offline.
        "instance_discovery": auth.is_public_cloud,
        "http_client": PinnedCASession(tls.ca_bundle, proxy_for=network.proxy_for if network else None),
    }


def error_from_result(result: dict[str, Any], *, status: int = 503) -> IdentityError:
    """An msal error dict -> IdentityError with the AADSTS code, the first line of the description, a hint."""
    error = str(result.get("error") or "error")
    description = str(result.get("error_description") or error)
    first_line = description.replace("\r", "").split("\n", 1)[0].strip()
    codes = result.get("error_codes") or []
    code = aadsts_code(first_line) or (f"AADSTS{codes[0]}" if codes else None)
    return IdentityError(
        f"{error}: {first_line}",
        code=code,
        retryable=error not in _NOT_RETRYABLE,
        status=status,
        hint=HINTS.get(code or ""),
    )


def token_from_result(result: dict[str, Any] | None, requested_at: float, *, status: int = 503) -> AccessToken:
    if not result:
        raise IdentityError("no token: the cache is empty and no sign-in happened", retryable=False, status=status)
    if "access_token" not in result:
        raise error_from_result(result, status=status)
    expires_in = float(result.get("expires_in") or 0)
    refresh_in = result.get("refresh_in")
    return AccessToken(
        token=str(result["access_token"]),
        expires_on=requested_at + expires_in,
        refresh_on=requested_at + float(refresh_in) if refresh_in else None,
    )


async def in_daemon_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)` in a thread of its own that never holds up the process's exit.

    Why not asyncio.to_thread: the loop's default executor is joined when the loop closes, so a request
    parked on a silent identity provider kept a stopping sidecar alive for msal's whole read timeout (30 s),
    past Kubernetes' grace period. Identity calls are rare (once per token lifetime, per caller at most), so a
    thread each is cheap.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this answer any more
            pass

    threading.Thread(target=work, name="sidecar-identity-call", daemon=True).start()
    return await future


async def call_msal(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking msal call in a daemon thread; network failures become retryable IdentityErrors."""
    try:
        return await in_daemon_thread(function, *args, **kwargs)
    except requests.exceptions.SSLError as exc:
        raise IdentityError(
            f"TLS verification of the identity provider failed: {_short(exc)}",
            retryable=True,
            hint="set tls.ca_bundle to the CA that signs the identity provider's certificate",
        ) from None
    except requests.exceptions.Timeout:
        raise IdentityError("the identity provider did not answer in time", retryable=True) from None
    except requests.exceptions.RequestException as exc:
        raise IdentityError(f"cannot reach the identity provider: {_short(exc)}", retryable=True) from None
    except LockError as exc:  # the sign-in cache's lock file (tokens/token_cache.py): held, or left by a crash
        raise IdentityError(f"the sign-in cache is locked: {_short(exc)}", retryable=True) from None
    except msal.exceptions.MsalServiceError as exc:
        # msal raises (rather than returning the error body) when the provider answers 5xx
        raise IdentityError(f"the identity provider is failing ({_short(exc)})", retryable=True) from None
    except ValueError as exc:
        # msal raises ValueError for a bad authority / unreadable discovery document
        raise IdentityError(f"identity provider configuration problem: {_short(exc)}", retryable=True) from None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."


# -- the confidential client app --------------------------------------------------------------------------


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
        self,
        auth: ConfidentialClientAuth,
        tls: TlsConfig,
        token_cache: msal.TokenCache | None = None,
        network: NetworkConfig | None = None,
    ) -> None:
        self._auth = auth
        self._tls = tls
        self._network = network
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
                **msal_options(self._auth, self._tls, self._network),
            )
            self._fingerprint = fingerprint
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.http_client.close()
