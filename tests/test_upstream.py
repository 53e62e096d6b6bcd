"""The upstream transport (sidecar/upstream.py): unreachable and silent upstreams, the read timeout as idle time,
redirects returned and never followed, static upstream headers."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness import _WATCH, BODY, CHAT, STREAM_BODY, StartSidecar, config_for, free_port, wait_ready

from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_static_upstream_headers_from_env_and_file(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    key_file = tmp_path / "function-key"
    key_file.write_text("function-key-from-file\n")
    running = await run_sidecar(
        config_for(
            stack,
            upstream={
                "headers": {"x-functions-key": "inline-function-key"},
                "headers_files": {"x-extra-key": str(key_file)},
            },
        )
    )
    await wait_ready(running)
    async with aiohttp.ClientSession() as http, http.get(running.url + "/openai/models?api-version=1") as response:
        assert response.status == 200
    (seen,) = stack.upstream.requests
    assert seen.headers["x-functions-key"] == "inline-function-key"
    assert seen.headers["x-extra-key"] == "function-key-from-file"
    _WATCH.secrets.update({"inline-function-key", "function-key-from-file"})


async def test_redirect_is_returned_and_its_target_never_gets_a_token(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    seen_at_target: list[dict[str, str]] = []

    async def target(request: web.Request) -> web.Response:
        seen_at_target.append(dict(request.headers))
        return web.json_response({"stolen": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", target)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        elsewhere = f"http://127.0.0.1:{port}/elsewhere"
        stack.upstream.script(Scripted.redirect(elsewhere, status=307))
        async with http.post(sidecar.url + CHAT, data=BODY, allow_redirects=False) as response:
            assert response.status == 307
            assert response.headers["Location"] == elsewhere
        assert seen_at_target == []
        # a client that follows redirects itself reaches the target without the sidecar's token
        stack.upstream.script(Scripted.redirect(elsewhere, status=302))
        async with http.get(sidecar.url + "/openai/models?api-version=2024-06-01") as response:
            assert response.status == 200
        assert len(seen_at_target) == 1
        assert "Authorization" not in seen_at_target[0]
        assert len(stack.upstream.requests) == 2
    finally:
        await runner.cleanup()


async def test_upstream_down_is_502_json(stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession) -> None:
    running = await run_sidecar(config_for(stack, upstream={"url": f"http://127.0.0.1:{free_port()}/api"}))
    await wait_ready(running)
    async with http.post(running.url + CHAT, data=BODY) as response:
        assert response.status == 502
        body = await response.json()
    assert body["error"]["code"] == "UpstreamUnreachable"
    assert "cannot connect" in body["error"]["message"]


async def test_upstream_silent_past_read_timeout_is_504_json(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    running = await run_sidecar(config_for(stack, upstream={"read_timeout": 0.5}))
    await wait_ready(running)
    stack.upstream.script(Scripted(hang=True))
    started = time.monotonic()
    async with http.post(running.url + CHAT, data=BODY) as response:
        assert response.status == 504
        body = await response.json()
    # upstream.read_timeout fired: not before it, and well before config_for's default of 5 s
    assert 0.4 < time.monotonic() - started < 4
    assert body["error"]["code"] == "UpstreamTimeout"


async def test_read_timeout_is_idle_time_not_a_total(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    running = await run_sidecar(config_for(stack, upstream={"read_timeout": 1.0}))
    await wait_ready(running)
    # ~1.6 s in total, never more than 0.2 s idle: five times below the timeout, so a busy machine's stalls
    # do not turn a gap into a timeout
    stack.upstream.stream_delay = 0.2
    stack.upstream.stream_chunks = 8
    async with http.post(running.url + CHAT, data=STREAM_BODY) as response:
        text = (await response.read()).decode()
    assert response.status == 200
    assert text.rstrip().endswith("data: [DONE]")
