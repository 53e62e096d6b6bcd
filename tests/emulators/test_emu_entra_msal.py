"""The Entra emulator driven by the real msal (sync, so it runs in worker threads)."""

from __future__ import annotations

import asyncio
import html
import re
import threading
import time
import webbrowser
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import msal
import pytest
import requests
from emu_support import CLIENT_ID, CLIENT_SECRET, DEMO_API, DEMO_SCOPE, verify
from harness import until

from sidecar_emulators import EntraEmulator, TestCA

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:msal"),
    pytest.mark.filterwarnings("ignore:response_mode='form_post' is recommended:UserWarning"),
]


def confidential(
    entra: EntraEmulator, http: requests.Session, credential: Any = CLIENT_SECRET, client_id: str = CLIENT_ID
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=entra.authority,
        instance_discovery=False,
        http_client=http,
    )


def public(entra: EntraEmulator, http: requests.Session, client_id: str) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        client_id, authority=entra.authority, instance_discovery=False, http_client=http
    )


async def test_discovery_document_and_jwks(entra: EntraEmulator, http: requests.Session) -> None:
    doc = (await asyncio.to_thread(http.get, f"{entra.authority}/v2.0/.well-known/openid-configuration")).json()
    assert doc["issuer"] == entra.issuer
    assert doc["token_endpoint"] == entra.token_endpoint
    assert doc["jwks_uri"] == entra.jwks_url
    assert doc["device_authorization_endpoint"] == f"{entra.authority}/oauth2/v2.0/devicecode"
    assert doc["authorization_endpoint"].startswith("https://127.0.0.1:")
    jwks = (await asyncio.to_thread(http.get, entra.jwks_url)).json()
    assert [k["kid"] for k in jwks["keys"]] == list(entra.public_keys)
    assert jwks["keys"][0]["kty"] == "RSA"
    # organizations/common are accepted for discovery; unknown tenants are not.
    orgs = await asyncio.to_thread(http.get, f"{entra.url}/organizations/v2.0/.well-known/openid-configuration")
    assert orgs.status_code == 200
    bad = await asyncio.to_thread(http.get, f"{entra.url}/nope/v2.0/.well-known/openid-configuration")
    assert bad.status_code == 400
    assert bad.json()["error_codes"] == [90002]


async def test_client_credentials_with_secret(entra: EntraEmulator, http: requests.Session) -> None:
    app = await asyncio.to_thread(confidential, entra, http)
    result = await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] > 3500
    claims = verify(entra, result["access_token"], DEMO_API)
    assert claims["appid"] == claims["azp"] == CLIENT_ID
    assert claims["idtyp"] == "app"
    assert claims["roles"] == ["Chat.Completions"]
    assert claims["ver"] == "2.0"
    assert claims["tid"] == entra.tenant_id
    assert entra.token_requests == 1
    assert entra.requests_by_grant == {"client_credentials": 1}
    assert entra.last_token_request_form["client_secret"] == CLIENT_SECRET
    assert entra.issued[-1]["uti"] == claims["uti"]


async def test_tokens_always_differ(entra: EntraEmulator, http: requests.Session) -> None:
    app = await asyncio.to_thread(confidential, entra, http)
    first = await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    app2 = await asyncio.to_thread(confidential, entra, http)
    second = await asyncio.to_thread(app2.acquire_token_for_client, [DEMO_SCOPE])
    assert first["access_token"] != second["access_token"]


async def test_wrong_secret_is_aadsts7000215(entra: EntraEmulator, http: requests.Session) -> None:
    app = await asyncio.to_thread(confidential, entra, http, "wrong")
    result = await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    assert result["error"] == "invalid_client"
    assert 7000215 in result["error_codes"]
    description = result["error_description"]
    assert description.startswith("AADSTS7000215: Invalid client secret provided.")
    assert re.search(r"\r\nTrace ID: [0-9a-f-]{36}\r\nCorrelation ID: [0-9a-f-]{36}\r\nTimestamp: ", description)
    # Entra echoes msal's client-request-id as the correlation id.
    assert result["correlation_id"] in description


async def test_secret_rotation(entra: EntraEmulator, http: requests.Session) -> None:
    entra.set_client_secret(CLIENT_ID, "rotated")
    old = await asyncio.to_thread(confidential, entra, http)
    assert 7000215 in (await asyncio.to_thread(old.acquire_token_for_client, [DEMO_SCOPE]))["error_codes"]
    new = await asyncio.to_thread(confidential, entra, http, "rotated")
    assert "access_token" in await asyncio.to_thread(new.acquire_token_for_client, [DEMO_SCOPE])


async def test_unknown_client_and_unknown_resource(entra: EntraEmulator, http: requests.Session) -> None:
    stranger = await asyncio.to_thread(confidential, entra, http, "x", "no-such-app")
    result = await asyncio.to_thread(stranger.acquire_token_for_client, [DEMO_SCOPE])
    assert result["error"] == "unauthorized_client"
    assert result["error_codes"] == [700016]
    app = await asyncio.to_thread(confidential, entra, http)
    result = await asyncio.to_thread(app.acquire_token_for_client, ["api://nobody/.default"])
    assert result["error_codes"] == [500011]
    result = await asyncio.to_thread(app.acquire_token_for_client, [f"{DEMO_API}/user_impersonation"])
    assert result["error_codes"] == [1002012]


@pytest.mark.parametrize("sha1_only", [False, True], ids=["PS256-x5t#S256", "RS256-x5t"])
async def test_certificate_credential(
    entra: EntraEmulator, ca: TestCA, http: requests.Session, sha1_only: bool
) -> None:
    pem = ca.issue_client_cert("cert-client")
    entra.register_client("cert-client", certificate_pem=pem)
    credential: dict[str, str] = {"private_key": pem.decode()}
    if sha1_only:
        # With only a SHA-1 thumbprint msal falls back to RS256 + x5t (msal/application.py:985-990).
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_pem_x509_certificates(pem)[0]
        credential["thumbprint"] = cert.fingerprint(hashes.SHA1()).hex()
    else:
        credential["public_certificate"] = pem.decode()
    app = await asyncio.to_thread(confidential, entra, http, credential, "cert-client")
    result = await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    assert "access_token" in result, result
    header = jwt.get_unverified_header(entra.last_token_request_form["client_assertion"])
    assert header["alg"] == ("RS256" if sha1_only else "PS256")
    assert verify(entra, result["access_token"], DEMO_API)["azpacr"] == "2"


async def test_certificate_not_registered(entra: EntraEmulator, ca: TestCA, http: requests.Session) -> None:
    registered = ca.issue_client_cert("cert-client")
    other = ca.issue_client_cert("someone-else")
    entra.register_client("cert-client", certificate_pem=registered)
    app = await asyncio.to_thread(
        confidential, entra, http, {"private_key": other.decode(), "public_certificate": other.decode()}, "cert-client"
    )
    result = await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]


async def test_device_flow_then_refresh(entra: EntraEmulator, http: requests.Session) -> None:
    entra.register_client("cli-app", public=True)
    alice_oid = entra.register_user("alice@contoso.example", name="Alice")
    app = await asyncio.to_thread(public, entra, http, "cli-app")
    flow = await asyncio.to_thread(app.initiate_device_flow, [f"{DEMO_API}/user_impersonation"])
    assert flow["interval"] == 1
    assert flow["verification_uri"] == f"{entra.url}/devicelogin"
    assert flow["message"] == (
        f"To sign in, use a web browser to open the page {entra.url}/devicelogin and enter the code "
        f"{flow['user_code']} to authenticate."
    )
    assert entra.device_flows_started == 1
    polling = asyncio.create_task(asyncio.to_thread(app.acquire_token_by_device_flow, flow))
    await until(lambda: entra.requests_by_grant["urn:ietf:params:oauth:grant-type:device_code"] >= 1, what="a poll")
    entra.approve_device_code(flow["user_code"], "alice@contoso.example")
    result = await polling
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == "alice@contoso.example"
    claims = verify(entra, result["access_token"], DEMO_API)
    assert claims["oid"] == alice_oid
    assert claims["scp"] == "user_impersonation"
    assert claims["name"] == "Alice"
    assert "refresh_token" in result

    [account] = await asyncio.to_thread(app.get_accounts)
    assert account["home_account_id"] == f"{alice_oid}.{entra.tenant_id}"
    refreshed = await asyncio.to_thread(
        app.acquire_token_silent, [f"{DEMO_API}/user_impersonation"], account, force_refresh=True
    )
    assert refreshed is not None and "access_token" in refreshed, refreshed
    assert refreshed["access_token"] != result["access_token"]
    assert entra.requests_by_grant["refresh_token"] == 1

    entra.revoke_refresh_tokens("alice@contoso.example")
    failed = await asyncio.to_thread(
        app.acquire_token_silent_with_error, [f"{DEMO_API}/user_impersonation"], account, force_refresh=True
    )
    assert failed is not None and 50173 in failed["error_codes"]


async def test_device_flow_declined_and_expired(ca: TestCA, http: requests.Session) -> None:
    async with EntraEmulator(ca, resources=[DEMO_API], device_code_lifetime=0.3) as entra:
        entra.register_client("cli-app", public=True)
        app = await asyncio.to_thread(public, entra, http, "cli-app")
        scopes = [f"{DEMO_API}/user_impersonation"]

        flow = await asyncio.to_thread(app.initiate_device_flow, scopes)
        entra.deny_device_code(flow["user_code"])
        declined = await asyncio.to_thread(app.acquire_token_by_device_flow, flow)
        assert declined["error"] == "authorization_declined"

        flow = await asyncio.to_thread(app.initiate_device_flow, scopes)
        await asyncio.sleep(0.35)
        expired = await asyncio.to_thread(app.acquire_token_by_device_flow, flow, exit_condition=lambda f: True)
        assert expired["error"] == "expired_token"
        assert expired["error_codes"] == [70020]


def play_browser(auth_uri: str, ca: TestCA) -> dict[str, str]:
    """Follow the authorize response like a browser would, returning the auth response fields."""
    response = requests.get(auth_uri, allow_redirects=False, verify=str(ca.ca_pem_path), timeout=5)
    if response.status_code == 302:
        return dict(parse_qsl(urlsplit(response.headers["Location"]).query))
    assert response.status_code == 200, response.text
    return dict(re.findall(r'name="([^"]+)" value="([^"]*)"', response.text))


@pytest.mark.parametrize("response_mode", [None, "form_post"])
async def test_auth_code_with_pkce(
    entra: EntraEmulator, ca: TestCA, http: requests.Session, response_mode: str | None
) -> None:
    entra.register_client("desktop-app", public=True)
    entra.interactive_user = "bob@contoso.example"
    app = await asyncio.to_thread(public, entra, http, "desktop-app")
    flow = await asyncio.to_thread(
        app.initiate_auth_code_flow,
        [f"{DEMO_API}/user_impersonation"],
        redirect_uri="http://localhost:53123",
        response_mode=response_mode,
    )
    auth_response = await asyncio.to_thread(play_browser, flow["auth_uri"], ca)
    assert auth_response["state"] == flow["state"]
    result = await asyncio.to_thread(app.acquire_token_by_auth_code_flow, flow, auth_response)
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == "bob@contoso.example"
    assert entra.last_token_request_form["code_verifier"] == flow["code_verifier"]

    # A code is single-use.
    again = await asyncio.to_thread(
        http.post,
        entra.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "client_id": "desktop-app",
            "code": auth_response["code"],
            "redirect_uri": "http://localhost:53123",
            "code_verifier": flow["code_verifier"],
        },
    )
    assert again.status_code == 400
    assert again.json()["error_codes"] == [54005]


class _HttpClientBrowser(webbrowser.BaseBrowser):
    """A "browser" for msal's acquire_token_interactive: fetch the authorize page, submit its form."""

    def __init__(self, ca: TestCA) -> None:
        super().__init__("emulator-test-browser")
        self._ca = ca
        self.visited: list[str] = []

    def open(self, url: str, new: int = 0, autoraise: bool = True) -> bool:
        self.visited.append(url)
        threading.Thread(target=self._sign_in, args=(url,), daemon=True).start()
        return True

    def _sign_in(self, url: str) -> None:
        page = requests.get(url, verify=str(self._ca.ca_pem_path), timeout=5)
        action = re.search(r'action="([^"]+)"', page.text)
        assert action is not None, page.text
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))
        requests.post(html.unescape(action.group(1)), data=fields, timeout=5)


async def test_acquire_token_interactive(
    entra: EntraEmulator, ca: TestCA, http: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msal's loopback listener only accepts form_post answers (oauth2cli/authcode.py do_GET rejects
    query responses): the emulator's authorize page must be a self-submitting form, like Entra's."""
    browser = _HttpClientBrowser(ca)
    # Public webbrowser API; monkeypatch restores the registry and BROWSER afterwards.
    monkeypatch.delenv("BROWSER", raising=False)
    webbrowser.register_standard_browsers()
    monkeypatch.setattr(webbrowser, "_tryorder", ["emulator-test-browser"])
    monkeypatch.setitem(webbrowser._browsers, "emulator-test-browser", [None, browser])
    entra.register_client("desktop-app", public=True)
    entra.interactive_user = "dave@contoso.example"
    app = await asyncio.to_thread(public, entra, http, "desktop-app")
    result = await asyncio.to_thread(app.acquire_token_interactive, [f"{DEMO_API}/user_impersonation"], timeout=10)
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == "dave@contoso.example"
    assert "response_mode=form_post" in browser.visited[0]


async def test_instance_discovery_endpoint(entra: EntraEmulator, http: requests.Session) -> None:
    # msal accepts an instance discovery URL instead of True/False (msal/authority.py:158-160).
    app = await asyncio.to_thread(
        msal.ConfidentialClientApplication,
        CLIENT_ID,
        client_credential=CLIENT_SECRET,
        authority=entra.authority,
        instance_discovery=f"{entra.url}/common/discovery/instance",
        http_client=http,
    )
    assert "access_token" in await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])


async def test_auth_code_wrong_redirect_uri_or_verifier(
    entra: EntraEmulator, ca: TestCA, http: requests.Session
) -> None:
    entra.register_client("desktop-app", public=True)
    entra.interactive_user = "bob@contoso.example"
    app = await asyncio.to_thread(public, entra, http, "desktop-app")
    flow = await asyncio.to_thread(
        app.initiate_auth_code_flow, [f"{DEMO_API}/user_impersonation"], redirect_uri="http://localhost:53123"
    )
    auth_response = await asyncio.to_thread(play_browser, flow["auth_uri"], ca)
    form = {"grant_type": "authorization_code", "client_id": "desktop-app", "code": auth_response["code"]}
    wrong_redirect = await asyncio.to_thread(
        http.post,
        entra.token_endpoint,
        data={**form, "redirect_uri": "http://localhost:1", "code_verifier": flow["code_verifier"]},
    )
    assert wrong_redirect.json()["error_codes"] == [50011]
    flow["code_verifier"] = "not-the-verifier-" + "x" * 40
    result = await asyncio.to_thread(app.acquire_token_by_auth_code_flow, flow, auth_response)
    assert result["error_codes"] == [501481]


async def test_on_behalf_of(entra: EntraEmulator, http: requests.Session) -> None:
    entra.register_client("middle-tier", secret="mt-secret")
    bob_oid = entra.register_user("bob@contoso.example", name="Bob")
    incoming = entra.issue_user_token("bob@contoso.example", client_id="frontend", audience="api://middle-tier")
    app = await asyncio.to_thread(confidential, entra, http, "mt-secret", "middle-tier")
    result = await asyncio.to_thread(app.acquire_token_on_behalf_of, incoming, [f"{DEMO_API}/user_impersonation"])
    assert "access_token" in result, result
    claims = verify(entra, result["access_token"], DEMO_API)
    assert claims["oid"] == bob_oid
    assert claims["name"] == "Bob"
    assert claims["azp"] == "middle-tier"
    assert claims["scp"] == "user_impersonation"
    form = entra.last_token_request_form
    assert form["requested_token_use"] == "on_behalf_of"
    assert form["assertion"] == incoming


async def test_on_behalf_of_rejections(entra: EntraEmulator, http: requests.Session) -> None:
    entra.register_client("middle-tier", secret="mt-secret")
    app = await asyncio.to_thread(confidential, entra, http, "mt-secret", "middle-tier")
    scopes = [f"{DEMO_API}/user_impersonation"]

    expired = entra.issue_user_token("bob@contoso.example", "frontend", "api://middle-tier", expired=True)
    result = await asyncio.to_thread(app.acquire_token_on_behalf_of, expired, scopes)
    assert result["error"] == "invalid_grant"
    assert result["error_codes"] == [500133]
    assert result["error_description"].startswith("AADSTS500133: Assertion is not within its valid time range.")

    wrong_audience = entra.issue_user_token("bob@contoso.example", "frontend", "api://someone-else")
    result = await asyncio.to_thread(app.acquire_token_on_behalf_of, wrong_audience, scopes)
    assert result["error_codes"] == [50013]


async def test_fail_mode_500_keeps_discovery_working(entra: EntraEmulator, http: requests.Session) -> None:
    entra.fail_mode = "500"
    app = await asyncio.to_thread(confidential, entra, http)  # discovery still answers
    # msal raises on 5xx (msal/oauth2cli/oauth2.py:293) instead of returning the error body...
    with pytest.raises(msal.exceptions.MsalServiceError, match="HTTP Error: 500"):
        await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    # ...so check the AADSTS-shaped body on the wire.
    raw = await asyncio.to_thread(http.post, entra.token_endpoint, data={"grant_type": "client_credentials"})
    assert raw.status_code == 500
    assert raw.json()["error"] == "temporarily_unavailable"
    assert raw.json()["error_codes"] == [90033]
    entra.fail_mode = None
    # msal also caches a 5xx for 5 s per app (throttled_http_client.py RetryAfterParser(5)): use a new app.
    fresh = await asyncio.to_thread(confidential, entra, http)
    assert "access_token" in await asyncio.to_thread(fresh.acquire_token_for_client, [DEMO_SCOPE])
    assert entra.token_requests == 3


async def test_fail_mode_hang_releases_when_cleared(entra: EntraEmulator, http: requests.Session) -> None:
    app = await asyncio.to_thread(confidential, entra, http)
    entra.fail_mode = "hang"
    pending = asyncio.create_task(asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE]))
    await until(lambda: entra.token_requests >= 1, what="the token request at the emulator")
    await asyncio.sleep(0.1)
    assert not pending.done()  # (a negative check: a slow machine can only miss an early answer)
    entra.fail_mode = None
    result = await asyncio.wait_for(pending, 30)
    assert "access_token" in result


async def test_fail_mode_hang_is_dropped_on_stop(ca: TestCA, http: requests.Session) -> None:
    entra = EntraEmulator(ca, resources=[DEMO_API])
    entra.register_client(CLIENT_ID, secret=CLIENT_SECRET)
    await entra.start()
    app = await asyncio.to_thread(confidential, entra, http)
    entra.fail_mode = "hang"
    pending = asyncio.create_task(asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE]))
    await until(lambda: entra.token_requests >= 1, what="the token request at the emulator")
    started = time.monotonic()
    await entra.stop()
    assert time.monotonic() - started < 5  # the parked request is dropped, not waited for (msal waits 30 s)
    with pytest.raises(requests.ConnectionError):
        await asyncio.wait_for(pending, 30)


async def test_fail_mode_refuse_drops_connection(entra: EntraEmulator, http: requests.Session) -> None:
    app = await asyncio.to_thread(confidential, entra, http)
    entra.fail_mode = "refuse"
    with pytest.raises(requests.ConnectionError):
        await asyncio.to_thread(app.acquire_token_for_client, [DEMO_SCOPE])
    assert entra.token_requests == 1


async def test_fail_mode_rejects_unknown_values(entra: EntraEmulator) -> None:
    with pytest.raises(ValueError, match="fail_mode"):
        entra.fail_mode = "503"  # type: ignore[assignment]


async def test_two_emulators_in_one_process(ca: TestCA, http: requests.Session) -> None:
    async with EntraEmulator(ca, tenant_id="tenant-a") as a, EntraEmulator(ca, tenant_id="tenant-b") as b:
        assert a.url != b.url
        a.register_client("app", secret="s")
        app = await asyncio.to_thread(confidential, a, http, "s", "app")
        assert "access_token" in await asyncio.to_thread(
            app.acquire_token_for_client, ["https://cognitiveservices.azure.com/.default"]
        )
        assert b.token_requests == 0
