"""Fixtures: a CA, and started emulators wired to it (each test gets its own, on free ports)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import requests
from emu_support import CLIENT_ID, CLIENT_SECRET, DEMO_API

from sidecar_emulators import EntraEmulator, ManagedIdentityEmulator, TestCA, UpstreamEmulator


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "ca")


@pytest.fixture
def http(ca: TestCA) -> Iterator[requests.Session]:
    """msal's http_client: verifies against the test CA on every request (REQUESTS_CA_BUNDLE-proof)."""
    with ca.requests_session() as session:
        yield session


@pytest.fixture
async def entra(ca: TestCA) -> AsyncIterator[EntraEmulator]:
    emulator = EntraEmulator(ca, resources=[DEMO_API])
    emulator.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    async with emulator:
        yield emulator


@pytest.fixture
async def upstream(entra: EntraEmulator) -> AsyncIterator[UpstreamEmulator]:
    async with UpstreamEmulator(jwks=entra.jwks, issuer=entra.issuer, audience=DEMO_API, base_path="/api") as up:
        yield up


@pytest.fixture
async def managed_identity(entra: EntraEmulator) -> AsyncIterator[ManagedIdentityEmulator]:
    async with ManagedIdentityEmulator(entra) as mi:
        yield mi


@pytest.fixture
def clean_identity_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove ambient Azure identity configuration so each test sets exactly what it needs."""
    for name in (
        "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT",
        "MSI_SECRET", "AZURE_POD_IDENTITY_AUTHORITY_HOST", "AZURE_CLIENT_ID", "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_CLIENT_SECRET",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
