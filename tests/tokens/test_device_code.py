"""device_code: a person approves a code once; the sidecar then renews from the saved sign-in, restarts included."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import openai
import pytest
from harness import (
    Cli,
    LogWatch,
    StartSidecar,
    chat,
    claims_printed,
    get_json,
    run_cli,
    sdk,
    until,
    use_env,
    wait_ready,
    write_config,
)
from rigs import signin_config

from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_DEVICE_CODE, GRANT_REFRESH_TOKEN

CLIENT_ID = "sidecar-device-cli"
USER = "dora@contoso.example"
CODE = re.compile(r"enter the code ([A-Z0-9]+) to authenticate")


def device_config(stack: Stack, cache: Path) -> dict[str, Any]:
    stack.entra.register_client(CLIENT_ID, public=True)
    return signin_config(stack, "device_code", CLIENT_ID, cache)


async def test_serve_prints_the_code_waits_for_approval_then_restarts_without_a_new_sign_in(
    stack: Stack,
    run_sidecar: StartSidecar,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    log_watch: LogWatch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_env(monkeypatch)
    oid = stack.entra.register_user(USER)
    cache = tmp_path / "signin" / "msal_token_cache.json"
    config = device_config(stack, cache)
    sidecar = await run_sidecar(config)
    await until(lambda: stack.entra.device_flows_started == 1, what="a device flow")
    printed = ""

    def code_printed() -> bool:
        nonlocal printed
        printed += capsys.readouterr().err
        return CODE.search(printed) is not None

    await until(code_printed, what="the code on stderr")
    match = CODE.search(printed)
    assert match is not None and "SIGN-IN NEEDED" in printed
    user_code = match.group(1)
    await until(lambda: _logged_code(log_watch) == user_code, what="the code in the log")

    status, body = await get_json(sidecar.url + "/readyz")
    assert (status, body["status"]) == (503, "not ready")
    client = sdk(sidecar.url)
    with pytest.raises(openai.APIStatusError) as waiting:
        await chat(client)  # answered at once, not after the person has signed in
    assert waiting.value.status_code == 503
    assert "waiting for a user to sign in" in waiting.value.message

    stack.entra.approve_device_code(user_code, USER)
    await wait_ready(sidecar)
    status, body = await get_json(sidecar.url + "/readyz")
    assert (status, body["status"]) == (200, "ready")
    reply = await chat(client)
    assert f"aud={stack.audience} oid={oid} appid={CLIENT_ID}" in reply
    # the refresh token is a credential: the cache file is the owner's only
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700

    # a restart renews from the saved sign-in: no second device flow
    await sidecar.aclose()
    refreshes = stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN]
    restarted = await run_sidecar(config)
    await wait_ready(restarted)
    async with sdk(restarted.url) as again:
        reply = await chat(again)
    assert f"oid={oid} appid={CLIENT_ID}" in reply
    assert stack.entra.device_flows_started == 1
    assert stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN] == refreshes + 1
    await client.close()


def _logged_code(log_watch: LogWatch) -> str | None:
    for line in reversed(log_watch.lines):
        if "sign-in needed" in line and (match := CODE.search(line)):
            return match.group(1)
    return None


async def test_login_and_logout_from_a_script(stack: Stack, tmp_path: Path) -> None:
    oid = stack.entra.register_user(USER)
    cache = tmp_path / "signin" / "msal_token_cache.json"
    path = write_config(tmp_path / "sidecar.yaml", device_config(stack, cache))
    login = await Cli.start("login", "--config", path)
    user_code = (await login.wait_for(CODE.pattern)).group(1)  # printed while `login` polls
    assert "SIGN-IN NEEDED" in login.stderr
    stack.entra.approve_device_code(user_code, USER)
    code, out, err = await login.finish()
    assert code == 0, err
    assert f"signed in as {USER}; token cache saved to {cache}" in err
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stack.entra.requests_by_grant[GRANT_DEVICE_CODE] >= 1

    # the saved sign-in is what `check` (and `serve`) use: no new device flow
    code, out, err = await run_cli("check", "--config", path)
    assert code == 0, err
    assert claims_printed(out)["oid"] == oid
    assert stack.entra.device_flows_started == 1

    code, out, err = await run_cli("logout", "--config", path)
    assert (code, err.strip()) == (0, f"signed out; removed {cache}")
    assert not cache.exists()
    code, out, err = await run_cli("logout", "--config", path)
    assert (code, err.strip()) == (0, "no saved sign-in to remove")
