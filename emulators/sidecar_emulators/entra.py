"""Entra ID (Azure AD v2.0 endpoint) emulator over HTTPS, for msal and azure-identity: its state, test-facing
controls and token endpoint (metadata endpoints: entra_discovery.py; user sign-in: entra_signin.py).

Fault switches (``fail_mode``) affect the token endpoint only, as the outages clients meet do (issuance degraded
while cached metadata and keys stay valid): a configured client exercises its retry/backoff path.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar_emulators import aadsts
from sidecar_emulators._server import AppServer, Emulator, drop_connection
from sidecar_emulators.aadsts import EntraError
from sidecar_emulators.entra_client_auth import FEDERATED_AUDIENCE, ClientAuthenticator
from sidecar_emulators.entra_directory import Directory, FederatedCredential
from sidecar_emulators.entra_discovery import check_tenant, instance_discovery, openid_configuration
from sidecar_emulators.entra_grants import (
    GRANT_AUTHORIZATION_CODE,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_DEVICE_CODE,
    GRANT_JWT_BEARER,
    GRANT_REFRESH_TOKEN,
    GrantHandler,
)
from sidecar_emulators.entra_signin import SignInEndpoints
from sidecar_emulators.entra_tokens import TokenMinter
from sidecar_emulators.keys import SigningKey
from sidecar_emulators.tls import TestCA

__all__ = [
    "DEFAULT_TENANT_ID",
    "GRANT_AUTHORIZATION_CODE",
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_DEVICE_CODE",
    "GRANT_JWT_BEARER",
    "GRANT_REFRESH_TOKEN",
    "EntraEmulator",
    "FailMode",
]

DEFAULT_TENANT_ID = "8a5b7c3e-1f2d-4e6a-9b0c-5d4e3f2a1b0c"
FailMode = Literal["500", "hang", "refuse"]


class EntraEmulator(Emulator):
    """Issues RS256 v2.0 tokens for registered clients, users and federated identities.

    Registration and inspection methods are plain synchronous calls; use them from the
    event-loop thread (tests drive msal from worker threads, the emulator from the loop).
    ``fail_mode`` may also be set from another thread.
    """

    def __init__(
        self,
        ca: TestCA,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        token_lifetime: float = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
        public_url: str | None = None,
        public_host: str | None = None,
        hostnames: Sequence[str] = (),
        resources: Sequence[str] = (),
        device_code_interval: int = 1,
        device_code_lifetime: float = 900,
    ) -> None:
        """``public_host`` is the name other machines use (e.g. ``entra`` in compose): it is put in the
        TLS certificate and advertised in every URL; ``public_url`` overrides the whole base URL
        (e.g. behind a port mapping). ``hostnames`` are extra certificate names; ``resources``
        are extra known APIs (audiences).

        ``device_code_interval`` is returned to msal, which sleeps that many whole seconds between
        polls (msal/oauth2cli/oauth2.py:446; 0 means busy polling); 1 keeps tests fast.
        """
        self.tenant_id = tenant_id
        self.device_code_interval = device_code_interval
        self.device_code_lifetime = device_code_lifetime
        self.interactive_user: str | None = None
        self._public_url = public_url.rstrip("/") if public_url else None
        self._public_host = public_host
        # The certificate must cover every name the emulator is advertised under.
        advertised = [public_host, urlsplit(public_url).hostname if public_url else None]
        hostnames = (*hostnames, *(name for name in advertised if name))

        self.directory = Directory(resources)
        self._signing_key = SigningKey()
        self._minter = TokenMinter(self._signing_key, issuer="", tenant_id=tenant_id, lifetime=token_lifetime)
        self._grants = GrantHandler(
            self.directory,
            self._minter,
            ClientAuthenticator(self.directory, tenant_id=tenant_id, federated_key=lambda: self.federated_key),
        )
        self._server = AppServer(self._build_app(), host=host, port=port, ssl_context=ca.server_ssl_context(*hostnames))

        self.token_requests = 0
        self.requests_by_grant: Counter[str] = Counter()
        self.jwks_requests = 0  # GETs of the signing keys (validators that cache keys must not refetch often)
        self.device_flows_started = 0
        self.last_token_request_form: dict[str, str] = {}

        self._fail_mode: FailMode | None = None
        self._mode_changed = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        await self._server.start()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._minter.issuer = self.issuer

    async def stop(self) -> None:
        # Release requests parked by "hang" so they drop their connections instead of
        # waiting out the server's shutdown timeout.
        self._stopping = True
        self._signal_mode_change()
        await self._server.stop()

    # ---- addresses ----

    @property
    def url(self) -> str:
        """Base URL, the value for msal's authority host / azure-identity's ``authority``."""
        return self._public_url or self._server.base_url(self._public_host)

    @property
    def authority(self) -> str:
        return f"{self.url}/{self.tenant_id}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/{self.tenant_id}/v2.0"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.authority}/discovery/v2.0/keys"

    @property
    def jwks(self) -> dict[str, Any]:
        """The JWKS document (what ``jwks_url`` serves); hand it to verifiers."""
        return {"keys": [self._signing_key.jwk(issuer=self.issuer)]}

    @property
    def public_keys(self) -> dict[str, rsa.RSAPublicKey]:
        """kid -> public key, for verifiers that take keys rather than a JWKS."""
        return {self._signing_key.kid: self._signing_key.public_key}

    @functools.cached_property
    def federated_key(self) -> SigningKey:
        """Stand-in for an external OIDC issuer's key (AKS service-account tokens).

        Created on first use: RSA key generation is the slowest part of starting an emulator.
        """
        return SigningKey()

    @property
    def token_lifetime(self) -> float:
        return self._minter.lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: float) -> None:
        self._minter.lifetime = seconds

    @property
    def issued(self) -> list[dict[str, Any]]:
        """Claims of every access token signed (token endpoint, managed identity, issue_user_token)."""
        return self._minter.issued

    # ---- registration ----

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        roles: Sequence[str] = ("Chat.Completions",),
        oid: str | None = None,
        public: bool = False,
        display_name: str | None = None,
        redirect_uris: Sequence[str] = (),
        identifier_uris: Sequence[str] = (),
    ) -> None:
        """A confidential client (secret and/or certificate PEM) or, with ``public=True``, a public one.

        ``roles`` are the app roles granted to the client (they appear in its app-only tokens).
        ``identifier_uris`` are Application ID URIs it exposes besides ``api://<client_id>`` (OBO assertions
        may be addressed to any of them).
        Loopback ``http://localhost:*`` redirect URIs are always accepted, as for Entra public clients.
        """
        self.directory.register_client(
            client_id,
            secret=secret,
            certificate_pem=certificate_pem,
            roles=roles,
            oid=oid,
            public=public,
            display_name=display_name,
            redirect_uris=redirect_uris,
            identifier_uris=identifier_uris,
        )

    def set_client_secret(self, client_id: str, secret: str | None) -> None:
        """Rotate: the old secret stops working immediately."""
        self.directory.clients[client_id].secret = secret

    def register_user(self, username: str, *, oid: str | None = None, name: str | None = None) -> str:
        return self.directory.register_user(username, oid=oid, name=name).oid

    def register_resource(self, identifier: str, *, scopes: Sequence[str] = ("user_impersonation",)) -> None:
        """Make an API (``api://...`` or GUID) known; unknown ones get AADSTS500011."""
        self.directory.register_resource(identifier, scopes)

    def knows_resource(self, resource: str) -> bool:
        return self.directory.resource_scopes(resource.rstrip("/")) is not None

    def register_federated_issuer(self, issuer: str, subject: str, client_id: str) -> None:
        """A federated identity credential on ``client_id`` trusting ``issuer``/``subject``."""
        self.directory.federations.add(FederatedCredential(issuer=issuer, subject=subject, client_id=client_id))

    def revoke_refresh_tokens(self, username: str | None = None) -> int:
        """Revoke refresh tokens (of one user, or all); redeeming one then fails with AADSTS50173."""
        return self.directory.revoke_refresh_tokens(username)

    # ---- token helpers for tests ----

    def issue_federated_token(
        self,
        issuer: str,
        subject: str,
        audience: str = FEDERATED_AUDIENCE,
        lifetime: float = 3600,
    ) -> str:
        """An external JWT (like an AKS projected service-account token) for workload identity."""
        now = int(time.time())
        claims = {"iss": issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now, "exp": int(now + lifetime)}
        return self.federated_key.sign(claims)

    def issue_user_token(
        self,
        username: str,
        client_id: str,
        audience: str,
        scp: str = "user_impersonation",
        lifetime: float | None = None,
        expired: bool = False,
    ) -> str:
        """A delegated access token as if ``client_id`` had signed ``username`` in (for OBO tests)."""
        user = self.directory.user(username)
        claims = self._minter.user_claims(
            user=user, client_id=client_id, audience=audience, scp=scp, lifetime=lifetime, expired=expired
        )
        return self._minter.access_token(claims)

    def mint_app_token(
        self,
        *,
        client_id: str,
        oid: str,
        audience: str,
        roles: Sequence[str] = (),
        extra_claims: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Sign an app-only token outside the token endpoint (used by the managed identity emulator)."""
        claims = self._minter.app_claims(
            client_id=client_id, oid=oid, audience=audience, roles=roles, azpacr="2", extra=extra_claims
        )
        return self._minter.access_token(claims), claims

    def sign(self, claims: dict[str, Any]) -> str:
        """Sign arbitrary claims with the tenant key, e.g. to forge a wrong-audience token in a test."""
        return self._signing_key.sign(claims)

    # ---- device flow control ----

    def approve_device_code(self, user_code: str, username: str) -> None:
        entry = self.directory.device_code_by_user_code(user_code)
        entry.username = self.directory.user(username).username

    def deny_device_code(self, user_code: str) -> None:
        self.directory.device_code_by_user_code(user_code).declined = True

    # ---- fault injection ----

    @property
    def fail_mode(self) -> FailMode | None:
        return self._fail_mode

    @fail_mode.setter
    def fail_mode(self, mode: FailMode | None) -> None:
        if mode is not None and mode not in get_args(FailMode):
            raise ValueError(f"fail_mode must be None or one of {get_args(FailMode)}, not {mode!r}")
        self._fail_mode = mode
        self._signal_mode_change()

    def _signal_mode_change(self) -> None:
        # Swap in a fresh event and set the old one: every parked request re-reads the mode.
        old, self._mode_changed = self._mode_changed, asyncio.Event()
        loop = self._loop
        if loop is None or self._loop_thread == threading.get_ident() or loop.is_closed():
            old.set()
        else:
            loop.call_soon_threadsafe(old.set)

    def reset_counters(self) -> None:
        self.token_requests = 0
        self.requests_by_grant.clear()
        self.jwks_requests = 0
        self.device_flows_started = 0
        self.last_token_request_form = {}
        self.issued.clear()

    # ---- HTTP ----

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/common/discovery/instance", self._instance_discovery)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        app.router.add_get("/{tenant}/discovery/keys", self._keys)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        SignInEndpoints(self).add_routes(app)
        return app

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        tenant = check_tenant(request, self.tenant_id)
        return web.json_response(openid_configuration(self.url, tenant, self.tenant_id))

    async def _instance_discovery(self, request: web.Request) -> web.Response:
        return web.json_response(instance_discovery(self.url, request))

    async def _keys(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        check_tenant(request, self.tenant_id)
        return web.json_response(self.jwks)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        check_tenant(request, self.tenant_id)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.last_token_request_form = form
        self.requests_by_grant[form.get("grant_type", "")] += 1
        fault = await self._fault(request)
        if fault is not None:
            return fault
        try:
            body = self._grants.handle(
                form,
                authorization=request.headers.get("Authorization"),
                assertion_audiences=self._assertion_audiences(request),
            )
        except EntraError as exc:
            return exc.response(request)
        return web.json_response(body, headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    async def _fault(self, request: web.Request) -> web.Response | None:
        while True:
            mode = self._fail_mode
            if self._stopping:
                drop_connection(request)
            if mode is None:
                return None
            if mode == "500":
                return aadsts.service_unavailable().response(request)
            if mode == "refuse":
                drop_connection(request)
            await self._mode_changed.wait()  # "hang": park until the mode changes or we stop

    def _assertion_audiences(self, request: web.Request) -> set[str]:
        """Token endpoint URLs a client assertion may be addressed to: msal uses discovery's token_endpoint;
        clients may reach us under another name (container hostname), so the request's Host counts too."""
        tenant = request.match_info["tenant"]
        bases = {self.url, f"https://{request.host}"}
        audiences = set()
        for base in bases:
            for segment in {tenant, self.tenant_id}:
                audiences.add(f"{base}/{segment}/oauth2/v2.0/token")
            audiences.add(f"{base}/{self.tenant_id}/v2.0")
        return audiences
