"""interactive: `sidecar login --browser` signs a person in through the system browser (auth code + PKCE, msal's
loopback listener); `serve` never opens a browser and renews from the saved sign-in."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from harness import (
    StartSidecar,
    chat,
    get_json,
    run_cli,
    sdk,
    start_serve,
    stop_serve,
    until,
    use_env,
    wait_ready,
    write_config,
)
from rigs import install_browser, signin_config

from sidecar.app import AUTHORIZER
from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_AUTHORIZATION_CODE, GRANT_REFRESH_TOKEN

CLIENT_ID = "sidecar-desktop"
USER = "ivan@contoso.example"


async def test_login_in_a_browser_then_serve_renews_silently(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_env(monkeypatch)
    stack.entra.register_client(CLIENT_ID, public=True)
    oid = stack.entra.register_user(USER)
    stack.entra.interactive_user = USER  # who signs in when the browser reaches the authorize page
    cache = tmp_path / "signin" / "msal_token_cache.json"
    config = signin_config(stack, "interactive", CLIENT_ID, cache)
    path = write_config(tmp_path / "sidecar.yaml", config)

    # serving before anyone signed in: not ready, and callers are told what to run
    sidecar = await run_sidecar(config)
    authorizer = sidecar.app[AUTHORIZER]
    await until(lambda: getattr(authorizer, "last_error", None) is not None, what="the first attempt")
    status, body = await get_json(sidecar.url + "/readyz")
    assert status == 503
    assert "run `sidecar login --browser`" in body["reason"]
    async with sdk(sidecar.url) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await chat(client)
    assert refused.value.status_code == 503
    assert "sidecar login --browser" in refused.value.message

    browser, visited = install_browser(tmp_path / "browser", stack.ca_pem_path)
    code, _, err = await run_cli("login", "--browser", "--config", path, env={"BROWSER": browser})
    assert code == 0, err
    assert f"signed in as {USER}; token cache saved to {cache}" in err
    [url] = visited.read_text().splitlines()
    assert url.startswith(f"{stack.authority}/oauth2/v2.0/authorize?")
    assert "response_mode=form_post" in url and "code_challenge_method=S256" in url
    assert stack.entra.requests_by_grant[GRANT_AUTHORIZATION_CODE] == 1

    # the running sidecar picks the sign-in up from the cache file, without a restart or a browser
    await wait_ready(sidecar)
    async with sdk(sidecar.url) as client:
        assert f"aud={stack.audience} oid={oid} appid={CLIENT_ID}" in await chat(client)

    # and so does a new `sidecar serve`
    refreshes = stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN]
    (tmp_path / "serve").mkdir()
    process, url = await start_serve(tmp_path / "serve", config)
    try:
        async with sdk(url) as client:
            assert f"aud={stack.audience} oid={oid} appid={CLIENT_ID}" in await chat(client)
    finally:
        await stop_serve(process)
    assert stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN] == refreshes + 1
    assert stack.entra.requests_by_grant[GRANT_AUTHORIZATION_CODE] == 1  # nobody signed in again
    assert stack.entra.device_flows_started == 0
