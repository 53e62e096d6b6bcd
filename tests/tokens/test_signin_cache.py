"""The sign-in cache (msal-extensions): a running `serve` renews from a sign-in saved later by another process,
forgets it once `sidecar logout` removed it, says once how the cache is kept, and a held cache lock is one
clear error, never a hang or a traceback."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import msal
import pytest
from harness import LogWatch, StartSidecar, run_cli
from tokens_support import post_chat, write_yaml

from sidecar.app import AUTHORIZER
from sidecar.tls import PinnedCASession
from sidecar.tokens.base import IdentityError
from sidecar.tokens.token_cache import PersistentTokenCache
from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_REFRESH_TOKEN

CLIENT_ID = "sidecar-signin-cache"
USER = "erin@contoso.example"
CODE = re.compile(r"enter the code ([A-Z0-9]+) to authenticate")


def signin_config(stack: Stack, flow: str, cache: Path) -> dict[str, Any]:
    stack.entra.register_client(CLIENT_ID, public=True)
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": stack.upstream_url, "read_timeout": 5},
        "tls": {"ca_bundle": str(stack.ca_pem_path)},
        "auth": {
            "flow": flow,
            "scope": stack.scope,
            "tenant_id": stack.tenant_id,
            "client_id": CLIENT_ID,
            "authority_host": stack.authority_host,
            "token_cache_path": str(cache),
        },
    }


async def sign_in_elsewhere(stack: Stack, cache: Path) -> None:
    """What `sidecar login` does, through a cache object of its own (another process's, as far as the running
    sidecar can tell): msal's device flow, approved at the emulator. In a thread: msal blocks, and the emulator
    answers on this loop."""

    def sign_in() -> None:
        http = PinnedCASession(stack.ca_pem_path)
        try:
            app = msal.PublicClientApplication(
                CLIENT_ID,
                authority=stack.authority,
                instance_discovery=False,
                http_client=http,
                token_cache=PersistentTokenCache(cache),
            )
            flow = app.initiate_device_flow(scopes=[stack.scope])
            stack.entra.approve_device_code(flow["user_code"], USER)
            result = app.acquire_token_by_device_flow(flow)
            assert "access_token" in result, result.get("error_description")
        finally:
            http.close()

    await asyncio.to_thread(sign_in)


async def until(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_serve_picks_up_a_later_sign_in_and_forgets_it_after_logout(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path, log_watch: LogWatch
) -> None:
    oid = stack.entra.register_user(USER)
    cache = tmp_path / "signin" / "msal_token_cache.json"
    config = signin_config(stack, "interactive", cache)
    sidecar = await run_sidecar(config)
    authorizer = sidecar.app[AUTHORIZER]
    await until(lambda: authorizer.last_error is not None, "the first attempt (nobody signed in)")

    await sign_in_elsewhere(stack, cache)
    await until(authorizer.is_ready, "the running sidecar to renew from the new sign-in")
    status, body = await post_chat(sidecar.url, {})
    assert status == 200 and f"oid={oid}" in body["choices"][0]["message"]["content"]
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    described = [line for line in log_watch.lines if f"sign-in cache {cache}" in line]
    assert len(described) == 1, described  # said once
    if "plain file" in described[0]:  # no libsecret/Keychain/DPAPI here: the file is the owner's only
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    else:
        assert "encrypted with" in described[0]

    code, _, err = await run_cli("logout", "--config", write_yaml(tmp_path / "sidecar.yaml", config))
    assert (code, err.strip()) == (0, f"signed out; removed {cache}")
    refreshes = stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN]
    current = authorizer.current
    assert current is not None
    # the upstream rejecting the held token makes the sidecar ask for a new one: the removed sign-in is not used
    with pytest.raises(IdentityError) as refused:
        await authorizer.token_after_rejection({}, current.token)
    assert "not signed in" in refused.value.one_line()
    assert stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN] == refreshes

    # signing in again is picked up by the same running sidecar (its refresh loop retries after the failure)
    await sign_in_elsewhere(stack, cache)
    await until(lambda: authorizer.last_error is None, "the renewal from the second sign-in")
    renewed = authorizer.current
    assert renewed is not None and renewed.token != current.token
    assert stack.entra.requests_by_grant[GRANT_REFRESH_TOKEN] == refreshes + 1


async def test_login_with_the_cache_locked_fails_with_one_line(stack: Stack, tmp_path: Path) -> None:
    """A lock file left behind (a process killed while writing) makes `sidecar login` wait for msal-extensions'
    lock, then fail with the path to remove, exit code 1 and no traceback."""
    stack.entra.register_user(USER)
    cache = tmp_path / "signin" / "msal_token_cache.json"
    path = write_yaml(tmp_path / "sidecar.yaml", signin_config(stack, "device_code", cache))
    cache.parent.mkdir(mode=0o700)
    lock = Path(f"{cache}.lockfile")
    lock.write_text("12345 a process that died")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "login", "--config", path,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    assert process.stderr is not None
    printed = b""
    try:
        while (match := CODE.search(printed.decode())) is None:
            printed += await asyncio.wait_for(process.stderr.readline(), 30)
        stack.entra.approve_device_code(match.group(1), USER)
        _, rest = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (printed + rest).decode()
    assert process.returncode == 1, err
    [line] = [line for line in err.splitlines() if line.startswith("sidecar: ")]
    assert line.startswith("sidecar: could not get a token: the sign-in cache is locked")
    assert str(lock) in line and "Traceback" not in err
    assert not cache.exists() and lock.exists()  # nothing written under someone else's lock
