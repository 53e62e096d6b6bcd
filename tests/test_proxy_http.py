"""Proxy behaviour at the HTTP level, where a raw client shows exactly what passes and what does not."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import time

import aiohttp
import pytest
from aiohttp import web
from harness import StartSidecar, config_for, free_port, wait_ready
from yarl import URL

from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def http() -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def test_upstream_sees_one_bearer_no_api_key_no_hop_by_hop_its_own_host(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer caller-supplied-must-be-replaced",
        "api-key": "caller-api-key",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "listed in Connection, so hop-by-hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "websocket",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
        "x-ms-client-request-id": "req-123",
        "User-Agent": "AzureOpenAI/Python 1.0",
        "Content-Type": "application/json",
        "X-Custom": "passes",
    }
    async with http.post(sidecar.url + CHAT, data=BODY, headers=headers) as response:
        assert response.status == 200
    (seen,) = stack.upstream.requests
    upstream_host = stack.upstream_url.split("//", 1)[1].split("/", 1)[0]
    assert seen.headers.getall("Host") == [upstream_host]
    assert len(seen.headers.getall("Authorization")) == 1
    assert seen.claims is not None and seen.claims["aud"] == stack.audience
    for gone in ("api-key", "X-Private-Hop", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Authorization",
                 "Proxy-Connection"):  # fmt: skip
        assert gone not in seen.headers, gone
    assert seen.headers.get("Connection", "keep-alive").lower() in ("keep-alive", "close")
    assert seen.headers["x-ms-client-request-id"] == "req-123"
    assert seen.headers["User-Agent"] == "AzureOpenAI/Python 1.0"
    assert seen.headers["X-Custom"] == "passes"
    assert seen.body_sha256 == hashlib.sha256(BODY).hexdigest()


async def test_gzip_response_passes_byte_exact(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    scripted = Scripted.gzip_json({"id": "x", "object": "chat.completion", "choices": []})
    stack.upstream.script(scripted)
    async with http.post(sidecar.url + CHAT, data=BODY, headers={"Content-Type": "application/json"}) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
    assert raw == scripted.wire_body
    assert json.loads(gzip.decompress(raw))["id"] == "x"


async def test_gzip_request_body_arrives_untouched(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    compressed = gzip.compress(BODY, mtime=0)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with http.post(sidecar.url + CHAT, data=compressed, headers=headers) as response:
        await response.read()
    (seen,) = stack.upstream.requests
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.body == compressed


async def test_large_chunked_upload_streams_byte_exact(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    boundary = "sidecarboundary"
    payload = bytes(range(256)) * (12 * 4096)  # 12 MiB: above any default body cap
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def chunks():  # no Content-Length: the sidecar must stream, not buffer
        yield head
        for start in range(0, len(payload), 1 << 20):
            yield payload[start : start + (1 << 20)]
        yield tail

    url = sidecar.url + "/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with http.post(url, data=chunks(), headers=headers) as response:
        answer = await response.json()
    assert answer["text"] == f"sha256={hashlib.sha256(payload).hexdigest()} size={len(payload)}"


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
    assert 0.4 < time.monotonic() - started < 3
    assert body["error"]["code"] == "UpstreamTimeout"


async def test_read_timeout_is_idle_time_not_a_total(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    running = await run_sidecar(config_for(stack, upstream={"read_timeout": 0.5}))
    await wait_ready(running)
    stack.upstream.stream_delay = 0.3
    stack.upstream.stream_chunks = 6  # ~1.8 s in total, never 0.5 s idle
    payload = json.dumps({"stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with http.post(running.url + CHAT, data=payload) as response:
        text = (await response.read()).decode()
    assert response.status == 200
    assert text.rstrip().endswith("data: [DONE]")


async def test_caller_disconnect_closes_the_upstream_stream(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    stack.upstream.stream_delay = 0.5
    stack.upstream.stream_chunks = 20
    payload = json.dumps({"stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    response = await http.post(sidecar.url + CHAT, data=payload)
    assert response.status == 200
    await response.content.readany()  # the first event is here; now the caller goes away
    left_at = time.monotonic()
    response.close()
    await asyncio.wait_for(stack.upstream.stream_closed_early_event.wait(), timeout=1.0)
    assert stack.upstream.stream_closed_early_at is not None
    assert stack.upstream.stream_closed_early_at - left_at < 1.0
    assert stack.upstream.streams_closed_early == 1


async def test_guards_health_and_not_found(
    stack: Stack, run_sidecar: StartSidecar, http: aiohttp.ClientSession
) -> None:
    stack.entra.fail_mode = "hang"  # no first token yet
    running = await run_sidecar(config_for(stack, inbound={"api_keys": ["key-one", "key-two"]}))
    async with http.get(running.url + "/healthz") as response:
        assert response.status == 200
    async with http.get(running.url + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "not ready"
    stack.entra.fail_mode = None
    await wait_ready(running)
    async with http.get(running.url + "/readyz") as response:
        assert response.status == 200

    async with http.post(running.url + CHAT, data=BODY) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "Unauthorized"
        assert response.headers["x-should-retry"] == "false"
    async with http.post(running.url + CHAT, data=BODY, headers={"api-key": "key-wrong"}) as response:
        assert response.status == 401
    async with http.post(running.url + CHAT, data=BODY, headers={"api-key": "key-two"}) as response:
        assert response.status == 200
    async with http.post(running.url + CHAT, data=BODY, headers={"Authorization": "Bearer key-one"}) as response:
        assert response.status == 200  # the plain OpenAI client sends its api_key this way
    assert len(stack.upstream.requests) == 2
    assert all("api-key" not in r.headers for r in stack.upstream.requests)

    for path in ("/", "/v1/chat/completions", "/openaix/models", "/admin"):
        async with http.get(running.url + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "NotFound"
    for path in ("/openai/../admin", "/openai/%2e%2e/admin", "/openai/deployments/%2E%2E/%2e%2E/x",
                 "/openai/..%2Fadmin", "/openai/%252e%252e/admin", "/openai/deployments/x/..\\..\\y"):  # fmt: skip
        raw = URL(running.url + path, encoded=True)  # the client must not normalise the '..' away itself
        async with http.get(raw, headers={"api-key": "key-one"}) as response:
            assert response.status == 400, path
            assert (await response.json())["error"]["code"] == "InvalidPath"
    assert len(stack.upstream.requests) == 2  # nothing more was forwarded


async def test_empty_401_twice_is_explained_with_the_audience(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    stack.upstream.script(Scripted.unauthorized(), Scripted.unauthorized())
    async with http.post(sidecar.url + CHAT, data=BODY) as response:
        assert response.status == 401
        body = await response.json()
        assert response.headers["x-should-retry"] == "false"
    assert body["error"]["code"] == "UpstreamUnauthorized"
    assert stack.audience in body["error"]["message"]
    assert "auth.scope" in body["error"]["message"]
    assert len(stack.upstream.requests) == 2  # the original and one replay, no more
    assert stack.entra.token_requests == 2


async def test_401_with_a_large_body_is_passed_through_without_replay(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    stack.upstream.script(Scripted(status=401, body=b'{"error": {"code": "custom"}}', headers={"X-Why": "policy"}))
    big = b"x" * (1024 * 1024 + 1)  # above what the sidecar keeps for a replay
    headers = {"Content-Type": "application/json"}
    async with http.post(sidecar.url + CHAT, data=io.BytesIO(big), headers=headers) as response:
        assert response.status == 401
        assert await response.read() == b'{"error": {"code": "custom"}}'
        assert response.headers["X-Why"] == "policy"
    assert len(stack.upstream.requests) == 1
    assert stack.upstream.requests[0].body_size == len(big)


async def test_non_loopback_without_api_keys_warns(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    from sidecar.config import Settings
    from sidecar.server import warn_if_exposed

    exposed = Settings(**config_for(stack, listen={"host": "0.0.0.0"}))
    with caplog.at_level("WARNING", logger="sidecar"):
        warn_if_exposed(exposed)
    assert "without inbound.api_keys" in caplog.text
    caplog.clear()
    guarded = Settings(**config_for(stack, listen={"host": "0.0.0.0"}, inbound={"api_keys": ["k"]}))
    with caplog.at_level("WARNING", logger="sidecar"):
        warn_if_exposed(guarded)
        warn_if_exposed(Settings(**config_for(stack)))
    assert caplog.text == ""


def test_access_token_repr_hides_the_token() -> None:
    from sidecar.tokens.base import AccessToken

    token = AccessToken("eyJhbGciOiJSUzI1NiJ9.secret-part.sig", 123.0)
    assert "secret-part" not in repr(token)
    assert "secret-part" not in str(token)
