"""azure_cli: the signed-in Azure CLI user's token, from `az account get-access-token` (a fake `az` on PATH that
behaves like the real one: it redeems its refresh token at the Entra emulator)."""

from __future__ import annotations

from pathlib import Path

from harness import claims_printed, config_for, run_cli, write_config
from rigs import AZ_CLI_CLIENT_ID, install_fake_az

from sidecar_emulators import Stack

USER = "cleo@contoso.example"


def cli_config(stack: Stack, tmp_path: Path) -> str:
    return write_config(tmp_path / "sidecar.yaml", config_for(stack, "azure_cli"))


async def test_check_runs_az_as_azure_identity_does(stack: Stack, tmp_path: Path) -> None:
    oid = stack.entra.register_user(USER)
    az = install_fake_az(tmp_path / "az", stack, USER)
    code, out, err = await run_cli("check", "--config", cli_config(stack, tmp_path), env={"PATH": az.path_env})
    assert code == 0, err
    claims = claims_printed(out)
    assert (claims["aud"], claims["oid"], claims["appid"]) == (stack.audience, oid, AZ_CLI_CLIENT_ID)
    # the resource, not the scope: azure-identity strips "/.default"
    assert az.calls() == [f"account get-access-token --output json --resource {stack.audience}"]


async def test_signed_out_cli_says_run_az_login(stack: Stack, tmp_path: Path) -> None:
    az = install_fake_az(tmp_path / "az", stack, None)  # prints the real CLI's message and exits 1
    code, _out, err = await run_cli("check", "--config", cli_config(stack, tmp_path), env={"PATH": az.path_env})
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("sidecar: could not get a token: ")
    assert "run `az login`" in line
    assert len(az.calls()) == 1


async def test_missing_az_is_one_clear_line(stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # PATH without any az; the interpreter is started by its full path
    code, _out, err = await run_cli("check", "--config", cli_config(stack, tmp_path), env={"PATH": str(empty)})
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("sidecar: could not get a token: Azure CLI not found on path")
    assert "install the Azure CLI" in line
