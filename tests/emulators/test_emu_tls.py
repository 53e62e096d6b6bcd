"""The test CA: server/client contexts, client certificates, independence from the ambient CA env vars."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar_emulators import EntraEmulator, TestCA


def test_ca_pem_written(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "nested")
    assert ca.ca_pem_path == tmp_path / "nested" / "ca.pem"
    assert ca.ca_pem_path.read_bytes() == ca.ca_pem
    assert x509.load_pem_x509_certificate(ca.ca_pem).extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _peer_certificate(port: int, server_hostname: str, ca: TestCA) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ca.client_ssl_context().wrap_socket(raw, server_hostname=server_hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_server_certificate_names(ca: TestCA) -> None:
    async with EntraEmulator(ca, public_host="entra") as entra:
        assert entra.url.startswith("https://entra:")
        port = int(entra.url.rsplit(":", 1)[1])
        for name in ("127.0.0.1", "localhost", "entra"):  # hostname verification passes for each
            cert = await asyncio.to_thread(_peer_certificate, port, name, ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "entra"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_client_certificate_pem_has_rsa_key_and_certificate(ca: TestCA) -> None:
    pem = ca.issue_client_cert("my-app")
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)  # msal signs assertions with PS256/RS256
    [cert] = x509.load_pem_x509_certificates(pem)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "my-app"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("ambient_bundle", ["system", "unset"])
async def test_clients_trust_only_what_they_are_given(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, ambient_bundle: str
) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if ambient_bundle == "unset":
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, "/etc/ssl/certs/ca-certificates.crt")
    async with EntraEmulator(ca) as entra:
        async with aiohttp.ClientSession() as session:
            async with session.get(entra.jwks_url, ssl=ca.client_ssl_context()) as response:
                assert response.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(entra.jwks_url)  # the system store does not know the test CA
        with ca.requests_session() as http:
            response = await asyncio.to_thread(http.get, entra.jwks_url)
            assert response.status_code == 200
