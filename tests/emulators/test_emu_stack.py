"""start_stack() and ``python -m sidecar_emulators``: the demo wiring end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import msal
import openai
import pytest

from sidecar_emulators import DEMO_AUDIENCE, start_stack

REPO_ROOT = Path(__file__).resolve().parents[2]


async def test_start_stack_end_to_end(tmp_path: Path) -> None:
    async with await start_stack(tmp_path, managed_identity=True) as stack:
        assert stack.ca_pem_path.exists()
        assert stack.scope == f"{DEMO_AUDIENCE}/.default"
        assert stack.upstream_url.endswith("/api")
        with stack.ca.requests_session() as http:
            app = await asyncio.to_thread(
                msal.ConfidentialClientApplication,
                stack.client_id,
                client_credential=stack.client_secret,
                authority=f"{stack.authority_host}/{stack.tenant_id}",
                instance_discovery=False,
                http_client=http,
            )
            result = await asyncio.to_thread(app.acquire_token_for_client, [stack.scope])
        token = result["access_token"]
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=stack.upstream_url, api_version="2024-10-21", azure_ad_token_provider=lambda: token
        ) as client:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert f"appid={stack.client_id}" in (completion.choices[0].message.content or "")
        details = stack.as_dict()
        assert details["managed_identity"]["imds_env"]["AZURE_POD_IDENTITY_AUTHORITY_HOST"].startswith("http://")
        json.dumps(details)  # the CLI prints exactly this


async def test_cli_prints_details_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca_path = tmp_path / "shared" / "ca.pem"
    ca_path.parent.mkdir()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar_emulators",
        "--host", "127.0.0.1", "--entra-port", "0", "--upstream-port", "0", "--managed-identity-port", "-1",
        "--ca-path", str(ca_path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        details = json.loads(line)
        assert details["ca_pem_path"] == str(ca_path)
        assert "managed_identity" not in details
        ssl_context = ssl.create_default_context(cafile=str(ca_path))  # what another container does
        async with aiohttp.ClientSession() as session:
            discovery = f"{details['authority']}/v2.0/.well-known/openid-configuration"
            async with session.get(discovery, ssl=ssl_context) as response:
                assert (await response.json())["issuer"] == details["issuer"]
            async with session.get(f"{details['upstream_url']}/openai/models") as response:
                assert response.status == 401
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_cli_options_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar_emulators.__main__ import parse_args

    monkeypatch.setenv("EMULATORS_HOST", "0.0.0.0")
    monkeypatch.setenv("EMULATORS_PUBLIC_HOST", "emulators")
    args = parse_args(["--entra-port", "9443"])
    assert (args.host, args.public_host, args.entra_port, args.upstream_port) == ("0.0.0.0", "emulators", 9443, 8081)
