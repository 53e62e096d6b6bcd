"""The Entra ID emulator's user sign-in endpoints: starting a device-code flow, the device-login page a
person approves it on, and the authorize endpoint of the interactive (authorization code) flow.

The token endpoint that later redeems these codes stays in entra.py with the grants (entra_grants.py).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from sidecar_emulators import aadsts
from sidecar_emulators.aadsts import EntraError
from sidecar_emulators.entra_discovery import check_tenant
from sidecar_emulators.entra_scopes import parse_scope
from sidecar_emulators.entra_tokens import client_info

if TYPE_CHECKING:
    from sidecar_emulators.entra import EntraEmulator

_AUTH_CODE_LIFETIME = 600.0


class SignInEndpoints:
    """The HTTP handlers for the user flows' sign-in side, on the emulator's directory and settings."""

    def __init__(self, entra: EntraEmulator) -> None:
        self._entra = entra

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{tenant}/oauth2/v2.0/devicecode", self.devicecode)
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self.authorize)
        app.router.add_get("/devicelogin", self.devicelogin_page)
        app.router.add_post("/devicelogin", self.devicelogin_submit)

    async def devicecode(self, request: web.Request) -> web.Response:
        entra = self._entra
        check_tenant(request, entra.tenant_id)
        form = await request.post()
        client_id = str(form.get("client_id", ""))
        scope = str(form.get("scope", ""))
        try:
            if not client_id:
                raise aadsts.missing_parameter("client_id")
            if client_id not in entra.directory.clients:
                raise aadsts.unknown_client(client_id, entra.tenant_id)
            scopes = parse_scope(scope)
            if scopes.resource is not None and not entra.knows_resource(scopes.resource):
                raise aadsts.unknown_resource(scopes.resource, entra.tenant_id)
        except EntraError as exc:
            return exc.response(request)
        entry = entra.directory.new_device_code(client_id, scope, entra.device_code_lifetime)
        entra.device_flows_started += 1
        verification_uri = f"{entra.url}/devicelogin"
        return web.json_response(
            {
                "user_code": entry.user_code,
                "device_code": entry.device_code,
                "verification_uri": verification_uri,
                "expires_in": max(1, int(entra.device_code_lifetime)),
                "interval": entra.device_code_interval,
                "message": f"To sign in, use a web browser to open the page {verification_uri} and enter the "
                f"code {entry.user_code} to authenticate.",
            }
        )

    async def authorize(self, request: web.Request) -> web.Response:
        """Interactive sign-in without a page: signs ``interactive_user`` in straight away."""
        entra = self._entra
        check_tenant(request, entra.tenant_id)
        query = request.query
        client = entra.directory.clients.get(query.get("client_id", ""))
        if client is None:
            return _error_page(aadsts.unknown_client(query.get("client_id", ""), entra.tenant_id))
        redirect_uri = query.get("redirect_uri", "")
        if not _redirect_allowed(redirect_uri, client.redirect_uris):
            return _error_page(
                EntraError(
                    "invalid_request",
                    50011,
                    f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect "
                    f"URIs configured for the application '{client.client_id}'.",
                )
            )
        response_mode = query.get("response_mode") or "query"
        params: dict[str, str] = {}
        try:
            if query.get("response_type") != "code":
                raise EntraError("unsupported_response_type", 700054, "response_type 'code' is required.")
            scopes = parse_scope(query.get("scope"))
            if scopes.resource is not None and not entra.knows_resource(scopes.resource):
                raise aadsts.unknown_resource(scopes.resource, entra.tenant_id)
            if entra.interactive_user is None:
                raise EntraError("login_required", 50058, "A silent sign-in request was sent but no user is signed in.")
            user = entra.directory.user(entra.interactive_user)
            entry = entra.directory.new_auth_code(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                scope=query.get("scope", ""),
                username=user.username,
                code_challenge=query.get("code_challenge"),
                code_challenge_method=query.get("code_challenge_method"),
                nonce=query.get("nonce"),
                expires_at=time.time() + _AUTH_CODE_LIFETIME,
            )
            params["code"] = entry.code
            if query.get("client_info") == "1":
                params["client_info"] = client_info(user.oid, entra.tenant_id)
        except EntraError as exc:
            body = exc.body()
            params = {"error": body["error"], "error_description": body["error_description"]}
        if "state" in query:
            params["state"] = query["state"]
        return _auth_response(redirect_uri, response_mode, params)

    async def devicelogin_page(self, request: web.Request) -> web.Response:
        # A minimal page so the docker demo can approve a device code from a real browser.
        return web.Response(
            content_type="text/html",
            text="<!doctype html><title>Emulated device login</title><form method=post>"
            "<label>Code <input name=user_code></label> <label>User <input name=username></label>"
            "<button>Sign in</button></form>",
        )

    async def devicelogin_submit(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            self._entra.approve_device_code(str(form.get("user_code", "")), str(form.get("username") or "user"))
        except KeyError:
            return web.Response(status=400, content_type="text/html", text="Unknown or expired code.")
        return web.Response(content_type="text/html", text="Signed in. You may close this window.")


def _redirect_allowed(redirect_uri: str, registered: Sequence[str]) -> bool:
    if redirect_uri in registered:
        return True
    parts = urlsplit(redirect_uri)
    # Entra lets native clients use any port on the loopback redirect URI.
    return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1")


def _auth_response(redirect_uri: str, response_mode: str, params: dict[str, str]) -> web.Response:
    if response_mode == "form_post":
        # msal's loopback listener only accepts form_post (msal/oauth2cli/authcode.py do_GET/do_POST);
        # Entra answers it with a self-submitting form.
        inputs = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>' for k, v in params.items()
        )
        page = (
            "<html><head><title>Working...</title></head><body>"
            f'<form method="POST" name="hiddenform" action="{html.escape(redirect_uri)}">{inputs}'
            '<noscript><p>Script is disabled. Click Submit to continue.</p><input type="submit" '
            'value="Submit" /></noscript></form><script language="javascript">'
            "document.forms[0].submit();</script></body></html>"
        )
        return web.Response(content_type="text/html", text=page)
    separator = "#" if response_mode == "fragment" else ("&" if "?" in redirect_uri else "?")
    raise web.HTTPFound(f"{redirect_uri}{separator}{urlencode(params)}")


def _error_page(error: EntraError) -> web.Response:
    body = error.body()
    text = f"<html><body><h1>Sign in failed</h1><p>{html.escape(body['error_description'])}</p></body></html>"
    return web.Response(status=400, content_type="text/html", text=text)
