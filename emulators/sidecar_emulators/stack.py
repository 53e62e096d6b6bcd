"""The demo stack: CA + Entra + secured upstream (+ managed identity), started together."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar_emulators.entra import DEFAULT_TENANT_ID, EntraEmulator
from sidecar_emulators.managed_identity import ManagedIdentityEmulator
from sidecar_emulators.tls import TestCA
from sidecar_emulators.upstream import UpstreamEmulator

DEMO_CLIENT_ID = "sidecar-demo-client"
DEMO_CLIENT_SECRET = "sidecar-demo-secret"  # an emulator credential, not a real one
DEMO_AUDIENCE = "api://sidecar-demo-api"


@dataclass
class Stack:
    """Everything a caller needs to point the sidecar (or msal/azure-identity) at the emulators."""

    ca: TestCA
    entra: EntraEmulator
    upstream: UpstreamEmulator
    managed_identity: ManagedIdentityEmulator | None
    client_id: str
    client_secret: str
    audience: str
    _exit_stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack, repr=False)

    @property
    def ca_pem_path(self) -> Path:
        return self.ca.ca_pem_path

    @property
    def tenant_id(self) -> str:
        return self.entra.tenant_id

    @property
    def authority_host(self) -> str:
        """Entra base URL (msal ``authority`` minus the tenant; azure-identity ``authority``)."""
        return self.entra.url

    @property
    def authority(self) -> str:
        return self.entra.authority

    @property
    def scope(self) -> str:
        return f"{self.audience}/.default"

    @property
    def upstream_url(self) -> str:
        return self.upstream.url

    def sidecar_config(self) -> dict[str, Any]:
        """A sidecar configuration (as the YAML file would hold it): client credentials against this stack,
        listening on a free loopback port."""
        return {
            "listen": {"host": "127.0.0.1", "port": 0},
            # probe: the start-up check adds a request the tests and the demo would count; on by default elsewhere
            "upstream": {"url": self.upstream_url, "probe": False},
            "tls": {"ca_bundle": str(self.ca_pem_path)},
            "auth": {
                "flow": "client_credentials",
                "scope": self.scope,
                "tenant_id": self.tenant_id,
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "authority_host": self.authority_host,
            },
        }

    def as_dict(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "ca_pem_path": str(self.ca_pem_path),
            "tenant_id": self.tenant_id,
            "authority_host": self.authority_host,
            "authority": self.authority,
            "issuer": self.entra.issuer,
            "jwks_url": self.entra.jwks_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "audience": self.audience,
            "scope": self.scope,
            "upstream_url": self.upstream_url,
        }
        if self.managed_identity is not None:
            details["managed_identity"] = {
                "url": self.managed_identity.url,
                "system_client_id": (
                    self.managed_identity.system_identity.client_id if self.managed_identity.system_identity else None
                ),
                "app_service_env": self.managed_identity.app_service_env(),
                "imds_env": self.managed_identity.imds_env(),
            }
        return details

    async def aclose(self) -> None:
        """Stop everything, in reverse start order."""
        await self._exit_stack.aclose()

    async def __aenter__(self) -> Stack:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def start_stack(
    tmpdir: Path | str,
    *,
    token_lifetime: float = 3600,
    client_id: str = DEMO_CLIENT_ID,
    client_secret: str = DEMO_CLIENT_SECRET,
    audience: str = DEMO_AUDIENCE,
    tenant_id: str = DEFAULT_TENANT_ID,
    base_path: str = "/api",
    stream_delay: float = 0.0,
    stream_chunks: int = 5,
    managed_identity: bool = False,
    host: str = "127.0.0.1",
    entra_port: int = 0,
    upstream_port: int = 0,
    managed_identity_port: int = 0,
    public_host: str | None = None,
    ca_path: Path | str | None = None,
) -> Stack:
    """Start the demo configuration: a confidential client with a secret, audience ``api://sidecar-demo-api``.

    ``public_host`` is the name other machines/containers use to reach the emulators (added to
    the TLS certificate and advertised in URLs); ``ca_path`` is where to write the CA PEM
    (default ``tmpdir/ca.pem``).
    """
    ca = TestCA(Path(ca_path)) if ca_path else TestCA.create(Path(tmpdir))
    entra = EntraEmulator(
        ca,
        tenant_id=tenant_id,
        token_lifetime=token_lifetime,
        host=host,
        port=entra_port,
        public_host=public_host,
        resources=(audience,),
    )
    exit_stack = contextlib.AsyncExitStack()
    try:
        await entra.start()
        exit_stack.push_async_callback(entra.stop)
        entra.register_client(client_id, secret=client_secret, display_name="sidecar demo")
        upstream = UpstreamEmulator(
            jwks=entra.jwks,
            issuer=entra.issuer,
            audience=audience,
            base_path=base_path,
            host=host,
            port=upstream_port,
            public_host=public_host,
            stream_delay=stream_delay,
            stream_chunks=stream_chunks,
        )
        await upstream.start()
        exit_stack.push_async_callback(upstream.stop)
        mi: ManagedIdentityEmulator | None = None
        if managed_identity:
            mi = ManagedIdentityEmulator(entra, host=host, port=managed_identity_port, public_host=public_host)
            await mi.start()
            exit_stack.push_async_callback(mi.stop)
    except BaseException:
        await exit_stack.aclose()
        raise
    return Stack(
        ca=ca,
        entra=entra,
        upstream=upstream,
        managed_identity=mi,
        client_id=client_id,
        client_secret=client_secret,
        audience=audience,
        _exit_stack=exit_stack,
    )
