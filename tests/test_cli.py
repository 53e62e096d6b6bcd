"""The command line as operators use it: subprocesses, exit codes, what is printed (and what never is)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from harness import config_for, run_cli, start_serve, stop_serve, write_config

from sidecar.claims import unverified_claims
from sidecar_emulators import Stack


async def test_check_prints_claims_never_the_token(stack: Stack, tmp_path: Path) -> None:
    code, out, err = await run_cli("check", "--config", write_config(tmp_path / "sidecar.yaml", config_for(stack)))
    assert code == 0, err
    assert f"aud                {stack.audience}" in out
    assert f"appid              {stack.client_id}" in out
    for claim in ("iss", "tid", "roles", "exp"):
        assert f"  {claim} " in out
    assert "expires in 59 min" in out or "expires in 60 min" in out
    assert "eyJ" not in out + err
    assert stack.client_secret not in out + err


async def test_check_with_wrong_secret_exits_1_with_the_aadsts_code(stack: Stack, tmp_path: Path) -> None:
    config = config_for(stack, auth={"client_secret": "definitely-the-wrong-secret"})
    code, out, err = await run_cli("check", "--config", write_config(tmp_path / "sidecar.yaml", config))
    assert code == 1
    assert "AADSTS7000215" in err
    assert "Secret ID" in err  # the hint: the secret's value, not its id
    assert "definitely-the-wrong-secret" not in out + err
    assert "Traceback" not in err


async def test_token_prints_a_raw_token_for_curl(stack: Stack, tmp_path: Path) -> None:
    code, out, err = await run_cli("token", "--config", write_config(tmp_path / "sidecar.yaml", config_for(stack)))
    assert code == 0, err
    token = out.strip()
    assert unverified_claims(token)["aud"] == stack.audience
    assert token not in err


async def test_env_overrides_the_file(stack: Stack, tmp_path: Path) -> None:
    config = config_for(stack, auth={"client_secret": "wrong-in-the-file"})
    path = write_config(tmp_path / "sidecar.yaml", config)
    code, _, err = await run_cli(
        "check", env={"SIDECAR_CONFIG": path, "SIDECAR_AUTH__CLIENT_SECRET": stack.client_secret}
    )
    assert code == 0, err


async def test_serve_runs_and_stops_on_sigterm(stack: Stack, tmp_path: Path) -> None:
    process, url = await start_serve(tmp_path, config_for(stack))
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/openai/models?api-version=2024-06-01") as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        err = await stop_serve(process)
    assert "sidecar listening on" in err
    assert "eyJ" not in err and stack.client_secret not in err


async def test_demo_exits_0() -> None:
    code, out, err = await run_cli("demo", "--chunk-delay", "0.02", timeout=120)
    assert code == 0, out + err
    assert "demo passed" in out
    assert "requests carrying an api-key: 0" in out


@pytest.mark.parametrize("absent", ["sidecar_emulators", "openai"])
async def test_demo_without_the_emulators_says_in_one_line_how_to_get_them(absent: str) -> None:
    # None in sys.modules is Python's own "no such module": the import raises ModuleNotFoundError exactly
    # as in a production install, where the emulators distribution (or one of its dependencies) is absent.
    program = f"import sys; sys.modules[{absent!r}] = None; from sidecar.cli import main; sys.exit(main(['demo']))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    err = stderr.decode()
    assert process.returncode == 2
    assert stdout == b""
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert "the demo needs the emulators: pip install ./emulators" in err
    assert ("missing module: openai" in err) == (absent == "openai")
