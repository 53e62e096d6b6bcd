"""The token endpoint's grant types: form fields in, Entra token response (or EntraError) out."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Collection, Mapping
from typing import Any

import jwt

from sidecar_emulators import aadsts
from sidecar_emulators.entra_client_auth import ClientAuthenticator, ClientAuthResult
from sidecar_emulators.entra_directory import ClientApp, Directory, User
from sidecar_emulators.entra_scopes import ScopeRequest, parse_scope
from sidecar_emulators.entra_tokens import TokenMinter, client_info

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_REFRESH_TOKEN = "refresh_token"
GRANT_AUTHORIZATION_CODE = "authorization_code"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class GrantHandler:
    def __init__(self, directory: Directory, minter: TokenMinter, authenticator: ClientAuthenticator) -> None:
        self._directory = directory
        self._minter = minter
        self._authenticator = authenticator

    def handle(
        self, form: Mapping[str, str], *, authorization: str | None, assertion_audiences: Collection[str]
    ) -> dict[str, Any]:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise aadsts.missing_parameter("grant_type")
        handlers = {
            GRANT_CLIENT_CREDENTIALS: self._client_credentials,
            GRANT_DEVICE_CODE: self._device_code,
            GRANT_REFRESH_TOKEN: self._refresh_token,
            GRANT_AUTHORIZATION_CODE: self._authorization_code,
            GRANT_JWT_BEARER: self._on_behalf_of,
        }
        handler = handlers.get(grant_type)
        if handler is None:
            raise aadsts.unsupported_grant_type(grant_type)
        auth = self._authenticator.authenticate(
            form, authorization=authorization, assertion_audiences=assertion_audiences
        )
        return handler(form, auth)

    # ---- grants ----

    def _client_credentials(self, form: Mapping[str, str], auth: ClientAuthResult) -> dict[str, Any]:
        if auth.client.public:
            raise aadsts.missing_client_credential()
        scope = form.get("scope")
        if not scope:
            raise aadsts.missing_scope()
        request = parse_scope(scope)
        if not request.is_default:
            raise aadsts.client_credentials_scope_without_default(scope)
        resource = self._known_resource(request)
        claims = self._minter.app_claims(
            client_id=auth.client.client_id,
            oid=auth.client.oid,
            audience=resource,
            roles=auth.client.roles,
            azpacr=auth.azpacr,
        )
        return self._minter.app_response(claims)

    def _device_code(self, form: Mapping[str, str], auth: ClientAuthResult) -> dict[str, Any]:
        code = form.get("device_code")
        if not code:
            raise aadsts.missing_parameter("device_code")
        entry = self._directory.device_codes.get(code)
        if entry is None or entry.client_id != auth.client.client_id or entry.redeemed:
            raise aadsts.invalid_grant()
        if time.time() >= entry.expires_at:
            raise aadsts.device_code_expired()
        if entry.declined:
            raise aadsts.device_code_declined()
        if entry.username is None:
            raise aadsts.authorization_pending()
        entry.redeemed = True
        user = self._directory.user(entry.username)
        return self._user_response(form, auth, user, entry.scope, nonce=None)

    def _refresh_token(self, form: Mapping[str, str], auth: ClientAuthResult) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise aadsts.missing_parameter("refresh_token")
        grant = self._directory.refresh_tokens.get(token)
        if grant is None:
            raise aadsts.invalid_grant("Invalid request. Request is malformed or invalid.")
        if grant.client_id != auth.client.client_id:
            raise aadsts.invalid_grant("The refresh token was issued to a different client.")
        if grant.revoked:
            raise aadsts.refresh_token_revoked()
        user = self._directory.user(grant.username)
        # Entra refresh tokens are multi-resource: the caller may ask for another API's scopes.
        return self._user_response(form, auth, user, form.get("scope") or grant.scope, nonce=None)

    def _authorization_code(self, form: Mapping[str, str], auth: ClientAuthResult) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise aadsts.missing_parameter("code")
        entry = self._directory.auth_codes.get(code)
        if entry is None or entry.client_id != auth.client.client_id:
            raise aadsts.invalid_grant()
        if entry.redeemed:
            raise aadsts.code_already_redeemed()
        if time.time() >= entry.expires_at:
            raise aadsts.code_expired()
        redirect_uri = form.get("redirect_uri", "")
        if redirect_uri != entry.redirect_uri:
            raise aadsts.redirect_uri_mismatch(redirect_uri)
        if entry.code_challenge is not None:
            verifier = form.get("code_verifier")
            if not verifier or not _pkce_matches(verifier, entry.code_challenge, entry.code_challenge_method):
                raise aadsts.pkce_mismatch()
        entry.redeemed = True
        user = self._directory.user(entry.username)
        return self._user_response(form, auth, user, form.get("scope") or entry.scope, nonce=entry.nonce)

    def _on_behalf_of(self, form: Mapping[str, str], auth: ClientAuthResult) -> dict[str, Any]:
        if form.get("requested_token_use") != "on_behalf_of":
            raise aadsts.missing_parameter("requested_token_use")
        if auth.client.public:
            raise aadsts.missing_client_credential()
        assertion = form.get("assertion")
        if not assertion:
            raise aadsts.missing_parameter("assertion")
        claims = self._verify_user_assertion(assertion, auth.client)
        # The new token keeps the identity the assertion carries; remember it so a later
        # refresh of the OBO refresh token yields the same oid.
        username = claims.get("preferred_username") or claims["oid"]
        user = self._directory.users.get(username) or self._directory.register_user(
            username, oid=claims["oid"], name=claims.get("name")
        )
        return self._user_response(form, auth, user, form.get("scope", ""), nonce=None)

    # ---- helpers ----

    def _verify_user_assertion(self, assertion: str, client: ClientApp) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                self._minter.key.public_key,
                algorithms=["RS256"],
                issuer=self._minter.issuer,
                options={"verify_aud": False, "verify_exp": False, "require": ["exp", "oid"]},
            )
        except jwt.PyJWTError as exc:
            raise aadsts.obo_assertion_bad_signature() from exc
        now = int(time.time())
        if int(claims["exp"]) <= now:
            raise aadsts.obo_assertion_expired(now, int(claims["exp"]))
        client_id = client.client_id
        if claims.get("aud") not in (client_id, f"api://{client_id}", *client.identifier_uris):
            raise aadsts.obo_audience_mismatch(claims.get("aud"), client_id)
        if claims.get("idtyp") == "app" or "scp" not in claims:
            raise aadsts.invalid_grant("The assertion is not a delegated (user) access token.")
        return claims

    def _known_resource(self, request: ScopeRequest) -> str:
        if request.resource is None:
            raise aadsts.missing_scope()
        if self._directory.resource_scopes(request.resource) is None:
            raise aadsts.unknown_resource(request.resource, self._minter.tenant_id)
        return request.resource

    def _user_response(
        self,
        form: Mapping[str, str],
        auth: ClientAuthResult,
        user: User,
        scope: str,
        *,
        nonce: str | None,
    ) -> dict[str, Any]:
        request = parse_scope(scope)
        if request.resource is None:
            # Only OIDC scopes: Entra issues a Graph token, as msal's sign-in-only flows expect.
            request = parse_scope(f"{scope} https://graph.microsoft.com/User.Read")
        resource = self._known_resource(request)
        if request.is_default:
            scp = " ".join(self._directory.resource_scopes(resource) or ())
        else:
            scp = " ".join(request.names)
        claims = self._minter.user_claims(
            user=user, client_id=auth.client.client_id, audience=resource, scp=scp, azpacr=auth.azpacr
        )
        response = self._minter.app_response(claims)
        response["scope"] = " ".join(request.resource_scopes)
        if "offline_access" in request.oidc:
            response["refresh_token"] = self._directory.new_refresh_token(auth.client.client_id, user.username, scope)
        if "openid" in request.oidc:
            response["id_token"] = self._minter.id_token(user=user, client_id=auth.client.client_id, nonce=nonce)
        if form.get("client_info") == "1":
            response["client_info"] = client_info(user.oid, self._minter.tenant_id)
        return response


def _pkce_matches(verifier: str, challenge: str, method: str | None) -> bool:
    if (method or "plain") == "plain":
        expected = verifier
    else:
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return hmac.compare_digest(expected, challenge)
