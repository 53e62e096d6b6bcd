"""default: DefaultAzureCredential takes the first credential of its chain that works (managed identity on App
Service is in the every-flow tests); here a developer machine (the Azure CLI) and a machine with none."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import StartSidecar, chat, config_for, run_cli, sdk, use_env, write_config
from rigs import AZ_CLI_CLIENT_ID, install_fake_az

from sidecar_emulators import Stack


async def test_on_a_developer_machine_it_is_the_azure_cli_user(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oid = stack.entra.register_user("cleo@contoso.example")
    az = install_fake_az(tmp_path / "az", stack, "cleo@contoso.example")
    use_env(monkeypatch, {"PATH": az.path_env})
    # no managed identity here: leaving it out spares the IMDS probe (a 1 s timeout off Azure)
    config = config_for(stack, "default", auth={"exclude_credentials": ["managed_identity"]})
    sidecar = await run_sidecar(config)
    async with sdk(sidecar.url) as client:
        assert f"aud={stack.audience} oid={oid} appid={AZ_CLI_CLIENT_ID}" in await chat(client)
    assert len(az.calls()) == 1


async def test_when_no_credential_works_check_names_what_each_said(stack: Stack, tmp_path: Path) -> None:
    az = install_fake_az(tmp_path / "az", stack, None)  # installed, signed out
    excluded = ["managed_identity", "azure_developer_cli", "azure_powershell"]
    config = config_for(stack, "default", auth={"exclude_credentials": excluded})
    path = write_config(tmp_path / "sidecar.yaml", config)
    code, _, err = await run_cli("check", "--config", path, env={"PATH": az.path_env})
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("sidecar: could not get a token: DefaultAzureCredential failed to retrieve a token")
    assert "(tried EnvironmentCredential: authentication unavailable; " in line
    assert "AzureCliCredential: Please run 'az login' to set up an account" in line
