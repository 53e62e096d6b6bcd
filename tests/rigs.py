"""Per-flow set-ups ("rigs") on the emulator stack for the token-flow tests: signing users in, the fake browser,
the fake `az`, a hop that holds managed-identity requests, and a garbage check for unclosed sessions.

A plain module with a name no other test folder uses (like tests/harness.py, which has everything else the
tests share), imported as `rigs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import html
import json
import os
import re
import stat
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import msal
import requests
from aiohttp import web
from harness import _WATCH, config_for, sdk
from openai import AsyncAzureOpenAI

from sidecar.tls import PinnedCASession
from sidecar.tokens.token_cache import PersistentTokenCache
from sidecar_emulators import ManagedIdentityEmulator, Stack
from sidecar_emulators.entra import GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_REFRESH_TOKEN

AZ_CLI_CLIENT_ID = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"  # the Azure CLI's own (public) client id
AKS_ISSUER = "https://oidc.prod-aks.azure.com/00000000-0000-0000-0000-000000000000/"
AKS_SUBJECT = "system:serviceaccount:ai:chat-app"

# -- signing users in -------------------------------------------------------------------------------------------


def signin_config(stack: Stack, flow: str, client_id: str, cache: Path) -> dict[str, Any]:
    """device_code or interactive as a public client of the stack's tenant, its sign-in saved in `cache`."""
    auth = {
        "tenant_id": stack.tenant_id,
        "client_id": client_id,
        "authority_host": stack.authority_host,
        "token_cache_path": str(cache),
    }
    return config_for(stack, flow, auth=auth)


def play_browser(url: str, ca: Path) -> tuple[str, dict[str, str]]:
    """What a browser does with Entra's answer to an authorize request: follow the redirect, or submit the
    self-posting form (form_post). Returns where the answer goes and its fields."""
    response = requests.get(url, allow_redirects=False, verify=str(ca), timeout=10)
    if response.status_code == 302:
        location = response.headers["Location"]
        return location.split("?", 1)[0], dict(parse_qsl(urlsplit(location).query))
    assert response.status_code == 200, response.text
    action = re.search(r'action="([^"]+)"', response.text)
    assert action is not None, response.text
    fields = {k: html.unescape(v) for k, v in re.findall(r'name="([^"]+)" value="([^"]*)"', response.text)}
    return html.unescape(action.group(1)), fields


def sign_in(stack: Stack, client_id: str, username: str, cache_path: Path) -> None:
    """Put `username`'s sign-in into the sidecar's msal cache file the way a browser sign-in would (auth code +
    PKCE through msal), so `serve` has an account to renew silently. Blocking: run it in a thread."""
    stack.entra.interactive_user = username
    cache = PersistentTokenCache(cache_path)
    http = PinnedCASession(stack.ca_pem_path)
    app = msal.PublicClientApplication(
        client_id, authority=stack.authority, instance_discovery=False, http_client=http, token_cache=cache
    )
    try:
        flow = app.initiate_auth_code_flow(
            [stack.scope], redirect_uri="http://localhost:53123", response_mode="form_post"
        )
        _, answer = play_browser(flow["auth_uri"], stack.ca_pem_path)
        result = app.acquire_token_by_auth_code_flow(flow, answer)
        assert "access_token" in result, result.get("error_description")
    finally:
        http.close()


BROWSER_PY = """\
import html, re, sys
import requests

url = sys.argv[1]
with open({log!r}, "a") as log:
    log.write(url + "\\n")
page = requests.get(url, verify={ca!r}, timeout=10)
action = re.search(r'action="([^"]+)"', page.text)
fields = {{k: html.unescape(v) for k, v in re.findall(r'name="([^"]+)" value="([^"]*)"', page.text)}}
requests.post(html.unescape(action.group(1)), data=fields, timeout=10)
"""


def install_browser(directory: Path, ca: Path) -> tuple[str, Path]:
    """A "browser" for the BROWSER variable: it signs in at the emulator and posts the answer to msal's loopback
    listener, as Entra's self-submitting form_post page makes a real browser do. Python's webbrowser waits for
    a BROWSER command to exit, and msal only serves its listener after that: the command returns at once and
    leaves the work to a child. Returns (BROWSER value, file listing the URLs it was sent to)."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "visited.txt"
    script = directory / "browser.py"
    script.write_text(BROWSER_PY.format(log=str(log), ca=str(ca)))
    launcher = directory / "browser.sh"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "{script}" "$1" >>"{directory / "browser.err"}" 2>&1 &\n')
    launcher.chmod(0o755)
    return str(launcher), log


# -- the fake Azure CLI --------------------------------------------------------------------------------------------

FAKE_AZ = """\
#!{python}
# A stand-in for the Azure CLI. `az account get-access-token` redeems the signed-in user's refresh token at the
# Entra emulator (as the real CLI's msal does) and prints what the real CLI prints.
import json, sys

# logged first: the call counts from when it was made, not from when `requests` finished importing
state = json.load(open({state!r}))
with open(state["log"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")

import datetime, os, time
import requests
while os.path.exists(state["hold"]):  # lets a test line requests up behind one CLI call
    time.sleep(0.01)
args = sys.argv[1:]
if args[:2] != ["account", "get-access-token"]:
    print("ERROR: the fake az only knows `account get-access-token`", file=sys.stderr)
    sys.exit(2)
if not state["refresh_token"]:
    print("ERROR: Please run 'az login' to setup account.", file=sys.stderr)
    sys.exit(1)
if "--scope" in args:
    scope = args[args.index("--scope") + 1]
else:
    scope = args[args.index("--resource") + 1].rstrip("/") + "/.default"
answer = requests.post(
    state["token_endpoint"],
    data={{"grant_type": "refresh_token", "client_id": state["client_id"], "refresh_token": state["refresh_token"],
          "scope": scope + " offline_access"}},
    verify=state["ca"], timeout=10,
).json()
if "access_token" not in answer:
    print("ERROR: " + answer.get("error_description", "failed"), file=sys.stderr)
    sys.exit(1)
expires_on = int(time.time()) + int(answer["expires_in"])
print(json.dumps({{
    "accessToken": answer["access_token"],
    "expiresOn": datetime.datetime.fromtimestamp(expires_on).strftime("%Y-%m-%d %H:%M:%S.%f"),
    "expires_on": expires_on,
    "subscription": "00000000-0000-0000-0000-000000000000",
    "tenant": state["tenant"],
    "tokenType": "Bearer",
}}, indent=2))
"""


@dataclass
class FakeAz:
    directory: Path
    state_path: Path

    @property
    def path_env(self) -> str:
        return f"{self.directory}{os.pathsep}{os.environ.get('PATH', '')}"

    def calls(self) -> list[str]:
        log = self.directory / "calls.txt"
        return log.read_text().splitlines() if log.exists() else []

    def hold(self) -> None:
        (self.directory / "hold").touch()

    def release(self) -> None:
        (self.directory / "hold").unlink(missing_ok=True)


def install_fake_az(directory: Path, stack: Stack, username: str | None) -> FakeAz:
    """An `az` on a PATH entry of its own, signed in as `username` (None: signed out)."""
    directory.mkdir(parents=True, exist_ok=True)
    if AZ_CLI_CLIENT_ID not in stack.entra.directory.clients:
        stack.entra.register_client(AZ_CLI_CLIENT_ID, public=True, display_name="Microsoft Azure CLI")
    refresh_token = ""
    if username is not None:
        stack.entra.register_user(username)
        refresh_token = stack.entra.directory.new_refresh_token(AZ_CLI_CLIENT_ID, username, "openid offline_access")
        _WATCH.secrets.add(refresh_token)
    state = {
        "token_endpoint": stack.entra.token_endpoint,
        "client_id": AZ_CLI_CLIENT_ID,
        "refresh_token": refresh_token,
        "tenant": stack.tenant_id,
        "ca": str(stack.ca_pem_path),
        "log": str(directory / "calls.txt"),
        "hold": str(directory / "hold"),
    }
    state_path = directory / "az-state.json"
    state_path.write_text(json.dumps(state))
    script = directory / "az"
    script.write_text(FAKE_AZ.format(python=sys.executable, state=str(state_path)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return FakeAz(directory, state_path)


# -- holding token requests -------------------------------------------------------------------------------------


class Gate:
    """An HTTP hop in front of the managed identity emulator that can hold requests, so a test can line many
    callers up behind one token request before letting it through."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.arrived = 0
        self._open = asyncio.Event()
        self._open.set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self._open.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await self._open.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as http,
            http.request(request.method, self.target + request.path_qs, headers=headers) as answer,
        ):
            return web.Response(status=answer.status, body=await answer.read(), content_type=answer.content_type)


# -- one set-up per flow ------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """Everything a test needs to run one flow against the stack."""

    flow: str
    config: dict[str, Any]
    appid: str  # the identity the upstream must see
    oid: str
    token_requests: Callable[[], int]  # token requests that reached the identity provider (held ones included)
    hold: Callable[[], None]  # make the identity provider hold token requests ...
    release: Callable[[], None]  # ... and answer them
    env: dict[str, str] = field(default_factory=dict)  # identity variables for this flow (set by the test)
    client_options: dict[str, Any] = field(default_factory=dict)  # for AsyncAzureOpenAI
    per_caller: bool = False  # on-behalf-of: tokens are per caller and refreshed on demand, not in the background

    def client(self, url: str) -> AsyncAzureOpenAI:
        return sdk(url, **self.client_options)

    def expect_in_reply(self, reply: str, audience: str) -> None:
        assert f"aud={audience} oid={self.oid} appid={self.appid}" in reply, reply


FLOWS = (
    "device_code", "interactive", "on_behalf_of", "managed_identity", "workload_identity", "azure_cli", "default",
)  # fmt: skip


class Rigs:
    """Builds rigs on one stack; each flow uses its own app registration and user, so rigs can coexist."""

    def __init__(self, stack: Stack, directory: Path) -> None:
        self.stack = stack
        self.entra = stack.entra
        self.directory = directory
        self._exit = contextlib.AsyncExitStack()
        self._mi: tuple[ManagedIdentityEmulator, Gate] | None = None

    async def aclose(self) -> None:
        await self._exit.aclose()

    def _entra_hold(self) -> None:
        self.entra.fail_mode = "hang"

    def _entra_release(self) -> None:
        self.entra.fail_mode = None

    async def managed_identity(self) -> tuple[ManagedIdentityEmulator, Gate]:
        if self._mi is None:
            mi = ManagedIdentityEmulator(self.entra)
            await mi.start()
            self._exit.push_async_callback(mi.stop)
            _WATCH.secrets.add(mi.identity_header)
            gate = Gate(mi.url)
            await gate.start()
            self._exit.push_async_callback(gate.stop)
            self._mi = (mi, gate)
        return self._mi

    async def build(self, flow: str) -> Rig:
        builder: Callable[[], Awaitable[Rig]] = getattr(self, f"_{flow}")
        return await builder()

    async def _user_signin(self, flow: str, client_id: str, username: str) -> Rig:
        self.entra.register_client(client_id, public=True)
        oid = self.entra.register_user(username)
        cache = self.directory / flow / "msal_token_cache.json"
        await asyncio.to_thread(sign_in, self.stack, client_id, username, cache)
        return Rig(
            flow=flow,
            config=signin_config(self.stack, flow, client_id, cache),
            appid=client_id,
            oid=oid,
            token_requests=lambda: self.entra.requests_by_grant[GRANT_REFRESH_TOKEN],
            hold=self._entra_hold,
            release=self._entra_release,
        )

    async def _device_code(self) -> Rig:
        return await self._user_signin("device_code", "sidecar-device-cli", "dora@contoso.example")

    async def _interactive(self) -> Rig:
        return await self._user_signin("interactive", "sidecar-desktop", "ivan@contoso.example")

    async def _on_behalf_of(self) -> Rig:
        stack = self.stack
        user = "olga@contoso.example"
        oid = self.entra.register_user(user)
        # the caller's token: a web front end signed the user in for the sidecar's API (audience = the sidecar app)
        caller_token = self.entra.issue_user_token(
            user, client_id="chat-frontend", audience=f"api://{stack.client_id}", lifetime=3600
        )
        return Rig(
            flow="on_behalf_of",
            config=config_for(stack, "on_behalf_of"),
            appid=stack.client_id,
            oid=oid,
            token_requests=lambda: self.entra.requests_by_grant[GRANT_JWT_BEARER],
            hold=self._entra_hold,
            release=self._entra_release,
            client_options={"azure_ad_token": caller_token},
            per_caller=True,
        )

    async def _managed_identity(self, flow: str = "managed_identity") -> Rig:
        mi, gate = await self.managed_identity()
        assert mi.system_identity is not None
        env = {"IDENTITY_ENDPOINT": gate.url + "/msi/token", "IDENTITY_HEADER": mi.identity_header}
        return Rig(
            flow=flow,
            config=config_for(self.stack, flow),
            appid=mi.system_identity.client_id,
            oid=mi.system_identity.object_id,
            token_requests=lambda: gate.arrived,
            hold=gate.hold,
            release=gate.release,
            env=env,
        )

    async def _default(self) -> Rig:
        # DefaultAzureCredential on App Service: no service principal or workload identity variables, so its
        # third credential, managed identity, answers
        return await self._managed_identity("default")

    async def _workload_identity(self) -> Rig:
        client_id = "aks-chat-app"
        self.entra.register_client(client_id)  # no secret: only the federated credential authenticates it
        self.entra.register_federated_issuer(AKS_ISSUER, AKS_SUBJECT, client_id)
        token_file = self.directory / "workload_identity" / "azure-identity-token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(self.entra.issue_federated_token(AKS_ISSUER, AKS_SUBJECT))
        # what the AKS webhook injects; the authority is the emulator's
        env = {
            "AZURE_TENANT_ID": self.stack.tenant_id,
            "AZURE_CLIENT_ID": client_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": self.stack.authority_host,
        }
        return Rig(
            flow="workload_identity",
            config=config_for(self.stack, "workload_identity"),
            appid=client_id,
            oid=self.entra.directory.clients[client_id].oid,
            token_requests=lambda: self.entra.requests_by_grant[GRANT_CLIENT_CREDENTIALS],
            hold=self._entra_hold,
            release=self._entra_release,
            env=env,
        )

    async def _azure_cli(self) -> Rig:
        user = "cleo@contoso.example"
        oid = self.entra.register_user(user)
        az = install_fake_az(self.directory / "azure_cli", self.stack, user)
        return Rig(
            flow="azure_cli",
            config=config_for(self.stack, "azure_cli", auth={"tenant_id": self.stack.tenant_id}),
            appid=AZ_CLI_CLIENT_ID,
            oid=oid,
            token_requests=lambda: len(az.calls()),
            hold=az.hold,
            release=az.release,
            env={"PATH": az.path_env},
        )


@contextlib.contextmanager
def unclosed_resources() -> Iterator[list[str]]:
    """Yields a list that, when the block ends, holds the ResourceWarnings raised in it or by a garbage collection
    at its end: aiohttp's "Unclosed client session" when a session (an azure-identity credential's) was dropped
    without being closed.

    pytest turns ResourceWarning into an error, but one raised in __del__ becomes an "unraisable exception"
    that only shows in the warnings summary and fails nothing: recording it here makes it count. Garbage left
    by earlier tests is collected before the block, so that it is not counted against this one."""
    found: list[str] = []
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield found
        finally:
            gc.collect()
    found.extend(str(w.message) for w in caught if issubclass(w.category, ResourceWarning))


def open_subprocess_transports() -> int:
    """asyncio subprocess transports not closed yet: an `az` that azure-identity started and that still runs (a
    cancelled credential call does not end its child; the transport closes once the child has exited)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.SubprocessTransport) and not o.is_closing())


@contextlib.asynccontextmanager
async def rigs_on(stack: Stack, directory: Path) -> AsyncIterator[Rigs]:
    rigs = Rigs(stack, directory)
    try:
        yield rigs
    finally:
        await rigs.aclose()
