"""What the tests of the token layer's seams share (a module name no other test folder uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar_emulators import Stack
from sidecar_emulators.entra import GRANT_JWT_BEARER

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


def obo_config(stack: Stack, **overrides: Any) -> dict[str, Any]:
    """on_behalf_of as the stack's own confidential client, in front of the stack's upstream."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": stack.upstream_url, "read_timeout": 5},
        "tls": {"ca_bundle": str(stack.ca_pem_path)},
        "auth": {
            "flow": "on_behalf_of",
            "scope": stack.scope,
            "tenant_id": stack.tenant_id,
            "client_id": stack.client_id,
            "client_secret": stack.client_secret,
            "authority_host": stack.authority_host,
        },
    }
    config.update(overrides)
    return config


def caller_token(stack: Stack, username: str) -> str:
    """A user's token for the sidecar's app, as a front end sends it."""
    return stack.entra.issue_user_token(username, client_id="chat-frontend", audience=f"api://{stack.client_id}")


def exchanges(stack: Stack) -> int:
    """On-behalf-of exchanges the identity provider answered."""
    return stack.entra.requests_by_grant[GRANT_JWT_BEARER]


def write_yaml(path: Path, config: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def post_chat(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + CHAT, data=BODY, headers={"Content-Type": "application/json", **headers}) as answer:
            return answer.status, await answer.json()


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as answer:
        return await answer.text()
