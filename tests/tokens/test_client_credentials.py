"""client_credentials (sidecar/tokens/client_credentials.py) through the real msal against the Entra ID emulator:
a wrong secret, a secret file rotated under a running sidecar, a certificate credential and its rotation, and
errors that never carry the secret."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import jwt
from harness import _WATCH, StartSidecar, config_for, post_chat, readyz, until, wait_ready

from sidecar.tokens.base import IdentityError
from sidecar_emulators import Scripted, Stack


async def test_wrong_secret_gives_503_with_the_aadsts_code_and_no_retry(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    running = await run_sidecar(config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    async with aiohttp.ClientSession() as http:
        answers: list[tuple[int, dict[str, str], dict]] = []

        async def refused() -> bool:  # the first calls may wait for the first attempt
            answers.append(await post_chat(http, running.url))
            return "AADSTS" in answers[-1][2]["error"]["message"]

        await until(refused, what="the identity provider's refusal", every=0.05)
        status, headers, body = answers[-1]
        assert status == 503
        assert headers["x-should-retry"] == "false"
        assert body["error"]["code"] == "AADSTS7000215"
        assert "wrong-secret-value" not in str(body)
        assert (await readyz(http, running.url))[0] == 503
    assert stack.upstream.requests == []


async def test_identity_errors_never_carry_secrets(stack: Stack) -> None:
    from sidecar.config import Settings
    from sidecar.tokens import client_credentials

    settings = Settings(**config_for(stack, auth={"client_secret": "wrong-secret-value"}))
    provider = client_credentials.build(settings)
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
        status, _, _ = await post_chat(http, running.url)
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

        async def renewed() -> bool:  # every call meanwhile succeeds
            status, _, _ = await post_chat(http, running.url)
            assert status == 200
            return stack.upstream.requests[-1].headers["Authorization"] != first_token

        # the old certificate no longer works: a new token can only come from the new file
        await until(renewed, what="the renewal with the rotated certificate", every=0.1)
        assert (await readyz(http, running.url))[0] == 200
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
    answers: list[tuple[int, dict[str, str], dict]] = []
    async with aiohttp.ClientSession() as http:

        async def refused() -> bool:
            answers.append(await post_chat(http, running.url))
            return answers[-1][0] == 503 and "AADSTS" in str(answers[-1][2])

        await until(refused, what="the identity provider's refusal", every=0.05)
    body = answers[-1][2]
    assert body["error"]["code"] == "AADSTS700027"
    assert "Certificates & secrets" in body["error"]["message"]
    assert "PRIVATE KEY" not in str(body)
    assert stack.upstream.requests == []


async def test_rotated_secret_file_is_used_without_restart(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(stack.client_secret + "\n")
    config = config_for(stack)
    del config["auth"]["client_secret"]
    config["auth"]["client_secret_file"] = str(secret_file)
    running = await run_sidecar(config)
    await wait_ready(running)
    assert stack.entra.last_token_request_form["client_secret"] == stack.client_secret

    rotated = "rotated-secret-value-2"
    _WATCH.secrets.add(rotated)
    stack.entra.set_client_secret(stack.client_id, rotated)
    secret_file.write_text(rotated + "\n")
    stack.upstream.script(Scripted.unauthorized())
    async with aiohttp.ClientSession() as http, http.get(running.url + "/openai/models?api-version=1") as response:
        assert response.status == 200  # the 401 made the sidecar fetch a new token: with the new secret
    assert stack.entra.last_token_request_form["client_secret"] == rotated
    assert stack.entra.token_requests == 2
