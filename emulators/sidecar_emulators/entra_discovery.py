"""The Entra ID emulator's metadata endpoints: instance discovery and OpenID configuration, as msal and
azure-identity read them before any token request, and the tenant check every tenant-scoped path makes."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from aiohttp import web

from sidecar_emulators.aadsts import EntraError

# Tenant path segments accepted besides the tenant id (msal may be given either).
TENANT_ALIASES = ("organizations", "common")
_CLAIMS_SUPPORTED = (
    "sub iss aud exp iat auth_time acr nonce preferred_username name tid ver at_hash c_hash email"
).split()


def check_tenant(request: web.Request, tenant_id: str) -> str:
    """The request's tenant path segment; an unknown tenant is answered with AADSTS90002 at once."""
    tenant = request.match_info["tenant"]
    if tenant != tenant_id and tenant not in TENANT_ALIASES:
        raise web.HTTPBadRequest(
            text=json.dumps(
                EntraError(
                    "invalid_tenant",
                    90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and "
                    "are signing into the correct cloud.",
                ).body(request.headers.get("client-request-id"))
            ),
            content_type="application/json",
        )
    return tenant


def openid_configuration(url: str, tenant: str, tenant_id: str) -> dict[str, object]:
    """The v2.0 OpenID configuration document for the path segment ``tenant`` of the emulator at ``url``."""
    base = f"{url}/{tenant}"
    # For multi-tenant segments Entra advertises a templated issuer, literally "{tenantid}".
    issuer = f"{url}/{tenant_id}/v2.0" if tenant == tenant_id else f"{url}/{{tenantid}}/v2.0"
    return {
        "token_endpoint": f"{base}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "jwks_uri": f"{base}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer,
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
        "claims_supported": _CLAIMS_SUPPORTED,
        "kerberos_endpoint": f"{base}/kerberos",
        "tenant_region_scope": "EU",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }


def instance_discovery(url: str, request: web.Request) -> dict[str, object]:
    """msal's instance discovery answer: this emulator is the only alias of itself."""
    # msal sends authorization_endpoint=https://{host without port}/{tenant}/oauth2/v2.0/authorize.
    endpoint = request.query.get("authorization_endpoint", "")
    parts = [p for p in urlsplit(endpoint).path.split("/") if p]
    tenant = parts[0] if parts else "common"
    host = urlsplit(url).netloc
    return {
        "tenant_discovery_endpoint": f"{url}/{tenant}/v2.0/.well-known/openid-configuration",
        "api-version": request.query.get("api-version", "1.1"),
        "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
    }
