"""A throw-away certificate authority for the HTTPS emulators and their clients."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import requests
import trustme

# Every loopback spelling a client may use to reach an emulator.
LOOPBACK_NAMES: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")


class TestCA:
    """Wraps ``trustme.CA``: issues the server certificate and client certificates.

    Clients must be told about ``ca_pem_path`` explicitly; nothing here touches the
    system trust store or the ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE`` variables.
    """

    # The name starts with "Test" because the brief asks for it; keep pytest from collecting it.
    __test__ = False

    def __init__(self, ca_pem_path: Path, ca: trustme.CA | None = None) -> None:
        self._ca = ca or trustme.CA()
        self.ca_pem_path = ca_pem_path
        self._ca.cert_pem.write_to_path(str(ca_pem_path))
        self._server_certs: dict[tuple[str, ...], trustme.LeafCert] = {}

    @classmethod
    def create(cls, directory: Path) -> TestCA:
        """Create a new CA and write its certificate to ``directory/ca.pem``."""
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / "ca.pem")

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem.bytes()

    def server_ssl_context(self, *extra_hostnames: str) -> ssl.SSLContext:
        """A server context whose certificate is valid for loopback plus ``extra_hostnames``.

        Extra names matter when the emulator is reached under a container name.
        """
        names = LOOPBACK_NAMES + tuple(n for n in extra_hostnames if n not in LOOPBACK_NAMES)
        cert = self._server_certs.get(names)
        if cert is None:
            cert = self._ca.issue_cert(*names)
            self._server_certs[names] = cert
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (not the system store)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_pem_path))
        return ctx

    def issue_client_cert(self, common_name: str) -> bytes:
        """PEM with the private key followed by the certificate, for certificate credentials.

        RSA because msal signs client assertions with PS256/RS256; trustme defaults to ECDSA.
        Pass the same PEM as msal's ``private_key`` and ``public_certificate``.
        """
        leaf = self._ca.issue_cert(common_name=common_name, key_type=trustme.KeyType.RSA)
        return leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes()

    def requests_session(self) -> requests.Session:
        """A ``requests.Session`` that verifies against this CA on every request.

        ``Session.verify`` loses to ``REQUESTS_CA_BUNDLE`` in requests' environment merging,
        so the CA is passed per request instead. Suitable as msal's ``http_client``.
        """
        return _CABundleSession(str(self.ca_pem_path))


class _CABundleSession(requests.Session):
    def __init__(self, ca_bundle: str) -> None:
        super().__init__()
        self._ca_bundle = ca_bundle

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("verify", self._ca_bundle)
        return super().request(method, url, *args, **kwargs)
