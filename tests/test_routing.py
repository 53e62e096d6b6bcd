"""Routes: several prefixes, upstreams and audiences in one sidecar; a configuration without routes unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness import StartSidecar, config_for, wait_ready, write_config

from sidecar.config import ConfigError, load_config
from sidecar_emulators import Stack
from sidecar_emulators.upstream import UpstreamEmulator

SECOND_AUDIENCE = "api://second-api"


@pytest.fixture
async def second(stack: Stack) -> AsyncIterator[UpstreamEmulator]:
    """Another resource with its own audience, e.g. an AI Services endpoint beside the Function proxy."""
    stack.entra.register_resource(SECOND_AUDIENCE)
    async with UpstreamEmulator(
        jwks=stack.entra.jwks, issuer=stack.entra.issuer, audience=SECOND_AUDIENCE, base_path="/ai"
    ) as emulator:
        yield emulator


async def test_two_routes_with_two_audiences_in_one_sidecar(
    stack: Stack, second: UpstreamEmulator, run_sidecar: StartSidecar
) -> None:
    config = config_for(
        stack,
        routes=[
            {"prefix": "/openai/", "upstream": stack.upstream_url},  # scope: auth.scope
            {
                "prefix": "/openai/deployments/second/",  # longer: wins for its own deployment
                "upstream": second.url,
                "scope": f"{SECOND_AUDIENCE}/.default",
                "headers": {"x-functions-key": "second-key"},
            },
        ],
    )
    running = await run_sidecar(config)
    await wait_ready(running)
    async with aiohttp.ClientSession() as http:
        for deployment in ("gpt-4o-mini", "second"):
            path = f"/openai/deployments/{deployment}/chat/completions?api-version=2024-06-01"
            async with http.post(running.url + path, json={"messages": []}) as response:
                assert response.status == 200, deployment
        async with http.get(running.url + "/openai/models?api-version=2024-10-21") as response:
            assert response.status == 200
    (first_seen_chat, _) = stack.upstream.requests
    (second_seen,) = second.requests
    assert first_seen_chat.claims is not None and first_seen_chat.claims["aud"] == stack.audience
    assert second_seen.claims is not None and second_seen.claims["aud"] == SECOND_AUDIENCE
    assert second_seen.path_qs == "/ai/openai/deployments/second/chat/completions?api-version=2024-06-01"
    assert second_seen.headers["x-functions-key"] == "second-key"
    assert "x-functions-key" not in first_seen_chat.headers
    assert stack.entra.token_requests == 2  # one token cache per scope, one token each


async def test_paths_outside_every_route_are_404_and_inside_a_new_prefix_forwarded(
    stack: Stack, second: UpstreamEmulator, run_sidecar: StartSidecar
) -> None:
    config = config_for(
        stack,
        routes=[{"prefix": "/models/", "upstream": second.url, "scope": f"{SECOND_AUDIENCE}/.default"}],
    )
    running = await run_sidecar(config)
    await wait_ready(running)
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + "/models/chat/completions?api-version=2024-05-01-preview", json={}) as r:
            assert r.status == 404  # the emulator serves /openai/ only, but the request reached it with its token
        async with http.post(running.url + "/openai/deployments/x/chat/completions", json={}) as r:
            assert r.status == 404
            assert json.loads(await r.read())["error"]["code"] == "NotFound"
    (seen,) = second.requests
    assert seen.path_qs.startswith("/ai/models/chat/completions") and seen.claims["aud"] == SECOND_AUDIENCE
    assert stack.upstream.requests == []


def test_route_configuration_errors_name_the_key(tmp_path: Path) -> None:
    base = {"auth": {"flow": "azure_cli", "scope": "api://x/.default"}}
    bad = [
        ({"routes": [{"prefix": "openai", "upstream": "https://a.example"}]}, "routes.0.prefix: must be a path"),
        ({"routes": [{"prefix": "/a/", "upstream": "http://a.example"}]}, "routes[/a/].upstream: http:// to a.example"),
        (
            {"routes": [{"prefix": "/a/", "upstream": "https://a"}, {"prefix": "/a/", "upstream": "https://b"}]},
            "routes: two routes have the same prefix",
        ),
        ({}, "upstream.url: missing"),
    ]
    for extra, expected in bad:
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(tmp_path / "sidecar.yaml", {**base, **extra}))
        assert any(line.startswith(expected) for line in caught.value.problems), (expected, caught.value.problems)


def test_workers_share_one_token_so_other_scopes_need_one_process(tmp_path: Path) -> None:
    """The parent hands auth.scope's token to the workers; a route with another scope would make every worker
    ask the identity provider itself."""
    config = {
        "auth": {"flow": "azure_cli", "scope": "api://x/.default"},
        "routes": [{"prefix": "/models/", "upstream": "https://ai.example", "scope": "api://other/.default"}],
        "workers": 2,
    }
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path / "sidecar.yaml", config))
    assert caught.value.problems == [
        "workers: a route with a scope other than auth.scope needs workers: 1 (workers share one token)"
    ]
    config["routes"] = [{"prefix": "/models/", "upstream": "https://ai.example"}]  # auth.scope: shared, fine
    assert load_config(write_config(tmp_path / "sidecar.yaml", config)).worker_count() == 2
