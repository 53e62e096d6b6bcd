"""Managed identity endpoint emulator (plain HTTP): App Service and IMDS protocols.

Tokens are signed by the Entra emulator, so they carry its issuer and verify against its JWKS.
Protocol details follow azure-identity 1.27 and msal 1.39:

* App Service: ``GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=...`` with header
  ``X-IDENTITY-HEADER: {IDENTITY_HEADER}``; user-assigned selectors ``client_id``, ``object_id``,
  ``mi_res_id`` (azure/identity/_credentials/app_service.py:31-37, msal/managed_identity.py:528-541).
* IMDS: ``GET {AZURE_POD_IDENTITY_AUTHORITY_HOST}/metadata/identity/oauth2/token?api-version=2018-02-01
  &resource=...`` with ``Metadata: true``; selectors ``client_id``, ``object_id``, ``msi_res_id``
  (azure/identity/_credentials/imds.py:58-63, msal/managed_identity.py:482-496). azure-identity's
  availability probe sends the request *without* the Metadata header and treats any HTTP error
  answer as "IMDS is there" (aio/_credentials/imds.py:73-81), so the 400 below is the right answer.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar_emulators import aadsts
from sidecar_emulators._server import AppServer, Emulator
from sidecar_emulators.entra import EntraEmulator
from sidecar_emulators.entra_directory import stable_oid

# azure-identity's aio credentials put identity_config on the wire verbatim, so {"resource_id": ...}
# arrives as an unknown parameter (the sync ones translate it through msal). The real endpoints would
# not select the identity from it; fail loudly instead of silently serving the system identity.
_RESOURCE_ID_HINT = "Unsupported query parameter 'resource_id': this endpoint selects by '{expected}'."

APP_SERVICE_PATH = "/msi/token"
IMDS_PATH = "/metadata/identity/oauth2/token"


@dataclass(frozen=True)
class ManagedIdentity:
    client_id: str
    object_id: str
    resource_id: str
    roles: tuple[str, ...]
    system_assigned: bool = False


def _default_resource_id(name: str) -> str:
    return (
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/emulator/providers/"
        f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )


class ManagedIdentityEmulator(Emulator):
    """Serves managed identity tokens for a system-assigned identity and user-assigned ones."""

    def __init__(
        self,
        entra: EntraEmulator,
        *,
        identity_header: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        public_host: str | None = None,
        system_assigned: bool = True,
        roles: Sequence[str] = ("Chat.Completions",),
    ) -> None:
        self._entra = entra
        self._public_host = public_host  # advertised in url/env instead of the bind address
        self.identity_header = identity_header or secrets.token_urlsafe(24)
        self.default_roles = tuple(roles)
        self.system_identity: ManagedIdentity | None = None
        if system_assigned:
            client_id = str(uuid.uuid4())
            self.system_identity = ManagedIdentity(
                client_id=client_id,
                object_id=stable_oid("mi", client_id),
                resource_id="/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/emulator/"
                "providers/Microsoft.Web/sites/emulator",
                roles=self.default_roles,
                system_assigned=True,
            )
        self.user_assigned: dict[str, ManagedIdentity] = {}
        self.token_requests = 0
        self.requests_by_protocol: Counter[str] = Counter()
        self.last_query: dict[str, str] = {}
        self._server = AppServer(self._build_app(), host=host, port=port)

    def add_user_assigned(
        self,
        client_id: str,
        *,
        object_id: str | None = None,
        resource_id: str | None = None,
        roles: Sequence[str] | None = None,
    ) -> ManagedIdentity:
        identity = ManagedIdentity(
            client_id=client_id,
            object_id=object_id or stable_oid("mi", client_id),
            resource_id=resource_id or _default_resource_id(client_id),
            roles=self.default_roles if roles is None else tuple(roles),
        )
        self.user_assigned[client_id] = identity
        return identity

    # ---- lifecycle / configuration ----

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    @property
    def url(self) -> str:
        return self._server.base_url(self._public_host)

    def app_service_env(self) -> dict[str, str]:
        """Environment that makes azure-identity/msal pick the App Service protocol."""
        return {"IDENTITY_ENDPOINT": f"{self.url}{APP_SERVICE_PATH}", "IDENTITY_HEADER": self.identity_header}

    def imds_env(self) -> dict[str, str]:
        """Environment that points the IMDS protocol at this emulator instead of 169.254.169.254.

        ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` replaces the IMDS authority in both azure-identity
        (_credentials/imds.py:60) and msal (managed_identity.py:492); azure-identity also skips its
        availability probe when it is set (aio/_credentials/imds.py:54-55).
        """
        return {"AZURE_POD_IDENTITY_AUTHORITY_HOST": self.url}

    # ---- identity selection ----

    def _select(self, query: Mapping[str, str], resource_id_params: Sequence[str]) -> ManagedIdentity | None:
        if "client_id" in query:
            return self.user_assigned.get(query["client_id"]) or (
                self.system_identity
                if self.system_identity and self.system_identity.client_id == query["client_id"]
                else None
            )
        object_id = query.get("object_id") or query.get("principal_id")
        candidates = [*self.user_assigned.values(), *([self.system_identity] if self.system_identity else [])]
        if object_id:
            return next((i for i in candidates if i.object_id == object_id), None)
        for name in resource_id_params:
            if name in query:
                wanted = query[name].lower()  # ARM ids are case-insensitive
                return next((i for i in candidates if i.resource_id.lower() == wanted), None)
        return self.system_identity

    def _mint(self, identity: ManagedIdentity, resource: str) -> tuple[str, dict[str, Any]]:
        return self._entra.mint_app_token(
            client_id=identity.client_id,
            oid=identity.object_id,
            audience=resource,
            roles=identity.roles,
            extra_claims={"xms_mirid": identity.resource_id},
        )

    def _count(self, request: web.Request, protocol: str) -> None:
        self.token_requests += 1
        self.requests_by_protocol[protocol] += 1
        self.last_query = dict(request.query)

    # ---- HTTP ----

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(APP_SERVICE_PATH, self._app_service)
        app.router.add_get(IMDS_PATH, self._imds)
        return app

    async def _app_service(self, request: web.Request) -> web.Response:
        self._count(request, "app_service")
        correlation_id = str(uuid.uuid4())

        def error(status: int, message: str) -> web.Response:
            body = {"statusCode": status, "message": message, "correlationId": correlation_id}
            return web.json_response(body, status=status)

        if request.headers.get("X-IDENTITY-HEADER") != self.identity_header:
            return error(401, "Unauthorized: the X-IDENTITY-HEADER header is missing or wrong.")
        query = request.query
        if not query.get("api-version"):
            return error(400, "No api-version parameter specified.")
        resource = query.get("resource", "").rstrip("/")
        if not resource:
            return error(400, "No resource parameter specified.")
        if "resource_id" in query:
            return error(400, _RESOURCE_ID_HINT.format(expected="mi_res_id"))
        identity = self._select(query, ("mi_res_id",))
        if identity is None:
            return error(400, "No MSI found for specified ClientId/ResourceId.")
        if not self._entra.knows_resource(resource):
            return error(400, aadsts.unknown_resource(resource, self._entra.tenant_id).body()["error_description"])
        token, claims = self._mint(identity, resource)
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(claims["exp"]),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )

    async def _imds(self, request: web.Request) -> web.Response:
        self._count(request, "imds")

        def error(error: str, description: str) -> web.Response:
            return web.json_response({"error": error, "error_description": description}, status=400)

        if request.headers.get("Metadata", "").lower() != "true":
            return error("invalid_request", "Required metadata header not specified")
        if "X-Forwarded-For" in request.headers:
            # IMDS refuses proxied requests.
            return error("invalid_request", "Request has X-Forwarded-For header")
        query = request.query
        if not query.get("api-version"):
            return error("invalid_request", "Required query variable 'api-version' is missing")
        resource = query.get("resource", "").rstrip("/")
        if not resource:
            return error("invalid_request", "Required query variable 'resource' is missing")
        if "resource_id" in query:
            return error("invalid_request", _RESOURCE_ID_HINT.format(expected="msi_res_id"))
        identity = self._select(query, ("msi_res_id", "mi_res_id"))
        if identity is None:
            return error("invalid_request", "Identity not found")
        if not self._entra.knows_resource(resource):
            description = aadsts.unknown_resource(resource, self._entra.tenant_id).body()["error_description"]
            return error("invalid_resource", description)
        token, claims = self._mint(identity, resource)
        now = int(time.time())
        expires_in = str(int(claims["exp"]) - now)
        return web.json_response(
            {
                "access_token": token,
                "client_id": identity.client_id,
                "expires_in": expires_in,
                "expires_on": str(claims["exp"]),
                "ext_expires_in": expires_in,
                "not_before": str(claims["nbf"]),
                "resource": resource,
                "token_type": "Bearer",
            }
        )
