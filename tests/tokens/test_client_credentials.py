"""Token behaviour seen from outside: through the real msal against the Entra ID emulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import jwt
from harness import StartSidecar, config_for, wait_ready

from sidecar.tokens.base import IdentityError
from sidecar_emulators import Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


async def status_of(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.post(url + CHAT, data=BODY, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.json()


async def readyz(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/readyz") as response:
        return response.status


async def test_identity_provider_outage_then_recovery(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.token_lifetime = 4
    running = await run_sidecar(config_for(stack, auth={"refresh_margin": 3}))
    await wait_ready(running)
    stack.entra.fail_mode = "500"  # from now on every token request fails
    async with aiohttp.ClientSession() as http:
        # calls keep succeeding on the current token until it expires ...
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            status, _ = await status_of(http, running.url)
            assert status == 200
            await asyncio.sleep(0.1)
        # ... then the sidecar answers 503 and is not ready, without ever sending an expired token
        deadline = time.monotonic() + 5
        while (status := (await status_of(http, running.url))[0]) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        status, body = await status_of(http, running.url)
        assert status == 503
        assert body["error"]["code"]
        assert "sidecar could not get a token" in body["error"]["message"]
        assert await readyz(http, running.url) == 503
        failed_attempts = stack.entra.token_requests
        # the identity provider comes back: everything recovers by itself
        stack.entra.fail_mode = None
        deadline = time.monotonic() + 10
        while await readyz(http, running.url) != 200:
            assert time.monotonic() < deadline, "did not recover"
            await asyncio.sleep(0.1)
        status, _ = await status_of(http, running.url)
        assert status == 200
    # it retried during the outage, with backoff (msal also holds back 5xx retries), never once per request
    assert 2 <= failed_attempts < 15
    assert all(r.claims is not None for r in stack.upstream.requests)  # never an expired/invalid token


async def test_wrong_secret_gives_503_with_the_aadsts_code_and_no_retry(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    running = await run_sidecar(config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 5
        while True:
            async with http.post(running.url + CHAT, data=BODY) as response:
                body = await response.json()
                if "AADSTS" in body["error"]["message"] or time.monotonic() > deadline:
                    break
            await asyncio.sleep(0.05)
        assert response.status == 503
        assert response.headers["x-should-retry"] == "false"
        assert body["error"]["code"] == "AADSTS7000215"
        assert "wrong-secret-value" not in str(body)
        assert await readyz(http, running.url) == 503
    assert stack.upstream.requests == []


async def test_identity_errors_never_carry_secrets(stack: Stack) -> None:
    from sidecar.config import Settings
    from sidecar.tokens.client_credentials import ClientCredentialsProvider

    settings = Settings(**config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    provider = ClientCredentialsProvider.from_settings(settings)
    try:
        await provider.fetch()
    except IdentityError as exc:
        error = exc
    else:  # pragma: no cover
        raise AssertionError("a wrong secret must fail")
    finally:
        await provider.aclose()
    assert error.code == "AADSTS7000215"
    assert not error.retryable
    for text in (str(error), repr(error), error.one_line(), repr(settings), str(settings.model_dump())):
        assert "wrong-secret-value" not in text


async def test_certificate_credential_and_a_rotated_certificate_file(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    pem_path = tmp_path / "sidecar-cert.pem"
    first = stack.ca.issue_client_cert("cert-app")
    stack.entra.register_client("cert-app", certificate_pem=first)
    pem_path.write_bytes(first)
    stack.entra.token_lifetime = 3
    config = config_for(stack, auth={"client_id": "cert-app", "certificate_path": str(pem_path), "refresh_margin": 1.5})
    del config["auth"]["client_secret"]
    running = await run_sidecar(config)
    async with aiohttp.ClientSession() as http:
        status, _ = await status_of(http, running.url)
        assert status == 200
        assert stack.upstream.requests[-1].claims["appid"] == "cert-app"
        # msal signed a client assertion with the certificate (no secret anywhere)
        form = stack.entra.last_token_request_form
        assert "client_secret" not in form
        assert jwt.get_unverified_header(form["client_assertion"])["alg"] == "PS256"

        # The certificate is rotated: the app registration and the mounted file change, the sidecar is not restarted.
        second = stack.ca.issue_client_cert("cert-app")
        stack.entra.register_client("cert-app", certificate_pem=second)
        pem_path.write_bytes(second)
        first_token = stack.upstream.requests[-1].headers["Authorization"]
        deadline = time.monotonic() + 10
        # the old certificate no longer works: a new token can only come from the new file
        while stack.upstream.requests[-1].headers["Authorization"] == first_token:
            assert time.monotonic() < deadline, "the renewal with the rotated certificate did not happen"
            await asyncio.sleep(0.1)
            status, _ = await status_of(http, running.url)
            assert status == 200
        assert await readyz(http, running.url) == 200
        assert stack.upstream.requests[-1].claims["appid"] == "cert-app"


async def test_unregistered_certificate_gives_503_with_the_aadsts_code_and_hint(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    stack.entra.register_client("cert-app", certificate_pem=stack.ca.issue_client_cert("cert-app"))
    pem_path = tmp_path / "someone-else.pem"
    pem_path.write_bytes(stack.ca.issue_client_cert("someone-else"))
    config = config_for(stack, auth={"client_id": "cert-app", "certificate_path": str(pem_path)})
    del config["auth"]["client_secret"]
    running = await run_sidecar(config)
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 5
        while (result := await status_of(http, running.url))[0] != 503 or "AADSTS" not in str(result[1]):
            assert time.monotonic() < deadline, result
            await asyncio.sleep(0.05)
    body = result[1]
    assert body["error"]["code"] == "AADSTS700027"
    assert "Certificates & secrets" in body["error"]["message"]
    assert "PRIVATE KEY" not in str(body)
    assert stack.upstream.requests == []
