"""Entra ID (AADSTS) error responses, shaped exactly like the real token endpoint's."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from aiohttp import web

# OAuth error code -> HTTP status, as Entra answers them.
_STATUS_BY_ERROR = {
    "invalid_client": 401,
    "temporarily_unavailable": 500,
}


class EntraError(Exception):
    """A token-endpoint failure: OAuth ``error`` plus an AADSTS code and message."""

    def __init__(self, error: str, code: int, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{error}: AADSTS{code}: {message}")
        self.error = error
        self.code = code
        self.message = message
        self.status = status or _STATUS_BY_ERROR.get(error, 400)

    def body(self, correlation_id: str | None = None) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        description = (
            f"AADSTS{self.code}: {self.message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        )
        return {
            "error": self.error,
            "error_description": description,
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }

    def response(self, request: web.BaseRequest) -> web.Response:
        # Entra echoes the caller's client-request-id (msal sends one) as the correlation id.
        body = self.body(request.headers.get("client-request-id"))
        return web.json_response(body, status=self.status)


# ---- the catalogue: one function per AADSTS code the emulator produces ----


def invalid_client_secret(client_id: str) -> EntraError:
    return EntraError(
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the client "
        f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    )


def missing_client_credential() -> EntraError:
    return EntraError(
        "invalid_client",
        7000218,
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    )


def public_client_with_credential() -> EntraError:
    return EntraError(
        "invalid_client",
        700025,
        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
    )


def unknown_client(client_id: str, tenant: str) -> EntraError:
    return EntraError(
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented "
        "to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
    )


def unknown_resource(resource: str, tenant: str) -> EntraError:
    return EntraError(
        "invalid_resource",
        500011,
        f"The resource principal named {resource} was not found in the tenant named {tenant}. This can "
        "happen if the application has not been installed by the administrator of the tenant or consented "
        "to by any user in the tenant. You might have sent your authentication request to the wrong tenant.",
    )


def missing_scope() -> EntraError:
    return missing_parameter("scope")


def client_credentials_scope_without_default(scope: str) -> EntraError:
    return EntraError(
        "invalid_scope",
        1002012,
        f"The provided value for scope {scope} is not valid. Client credential flows must have a scope "
        "value with /.default suffixed to the resource identifier (application ID URI).",
    )


def invalid_scope(scope: str) -> EntraError:
    return EntraError(
        "invalid_scope",
        70011,
        f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid.",
    )


def missing_parameter(name: str) -> EntraError:
    return EntraError("invalid_request", 900144, f"The request body must contain the following parameter: '{name}'.")


def unsupported_grant_type(grant_type: str) -> EntraError:
    return EntraError("unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'.")


def assertion_cert_not_registered(client_id: str, thumbprint: str) -> EntraError:
    return EntraError(
        "invalid_client",
        700027,
        "The certificate with identifier used to sign the client assertion is not registered on "
        f"application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', "
        "Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for "
        f"app Id '{client_id}'.]",
    )


def assertion_bad_signature() -> EntraError:
    return EntraError("invalid_client", 700027, "Client assertion failed signature validation.")


def assertion_invalid(detail: str) -> EntraError:
    return EntraError("invalid_client", 50027, f"JWT token is invalid or malformed. {detail}")


def assertion_client_mismatch() -> EntraError:
    return EntraError(
        "invalid_client",
        700021,
        "Client assertion application identifier doesn't match 'client_id' parameter.",
    )


def assertion_expired() -> EntraError:
    return EntraError("invalid_client", 700024, "Client assertion is not within its valid time range.")


def federated_issuer_unknown(issuer: str) -> EntraError:
    return EntraError(
        "invalid_client",
        700211,
        f"No matching federated identity record found for presented assertion issuer '{issuer}'. Please "
        "check your federated identity credential Subject, Audience and Issuer against the presented "
        "assertion.",
    )


def federated_audience_mismatch(audience: object) -> EntraError:
    return EntraError(
        "invalid_client",
        700212,
        f"No matching federated identity record found for presented assertion audience '{audience}'. Please "
        "check your federated identity credential Subject, Audience and Issuer against the presented "
        "assertion.",
    )


def federated_subject_mismatch(issuer: str, subject: str, audience: object) -> EntraError:
    return EntraError(
        "invalid_client",
        70021,
        "No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{audience}'.",
    )


def authorization_pending() -> EntraError:
    return EntraError(
        "authorization_pending",
        70016,
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    )


def device_code_expired() -> EntraError:
    return EntraError(
        "expired_token",
        70020,
        "The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
    )


def device_code_declined() -> EntraError:
    return EntraError("authorization_declined", 70000, "The user declined to authorize the request.")


def invalid_grant(detail: str = "Provided grant is invalid or malformed.") -> EntraError:
    return EntraError("invalid_grant", 70000, detail)


def refresh_token_revoked() -> EntraError:
    return EntraError(
        "invalid_grant",
        50173,
        "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user "
        "might have changed or reset their password.",
    )


def code_already_redeemed() -> EntraError:
    return EntraError(
        "invalid_grant",
        54005,
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code.",
    )


def code_expired() -> EntraError:
    return EntraError(
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity.",
    )


def pkce_mismatch() -> EntraError:
    return EntraError(
        "invalid_grant",
        501481,
        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
    )


def redirect_uri_mismatch(redirect_uri: str) -> EntraError:
    return EntraError(
        "invalid_grant",
        50011,
        f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URI used to "
        "obtain the authorization code.",
    )


def obo_assertion_expired(now: int, exp: int) -> EntraError:
    return EntraError(
        "invalid_grant",
        500133,
        "Assertion is not within its valid time range. Ensure that the access token is not expired before "
        f"using it for user assertion, or request a new token. Current time: {_iso(now)}, expiry time of "
        f"assertion {_iso(exp)}.",
    )


def obo_assertion_bad_signature() -> EntraError:
    return EntraError("invalid_grant", 50013, "Assertion failed signature validation.")


def obo_audience_mismatch(audience: object, client_id: str) -> EntraError:
    return EntraError(
        "invalid_grant",
        50013,
        f"Assertion audience does not match the Client app presenting the assertion. The audience in the "
        f"assertion was '{audience}' and the expected audience is '{client_id}' or one of the Application "
        "Id URIs of this web API.",
    )


def service_unavailable() -> EntraError:
    return EntraError(
        "temporarily_unavailable",
        90033,
        "A transient error has occurred. Please try again.",
        status=500,
    )


def _iso(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%m/%d/%Y %H:%M:%S")
