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
from harness import BODY, CHAT, STREAM_BODY

from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack


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


async def test_caller_disconnect_closes_the_upstream_stream(
    stack: Stack, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    stack.upstream.stream_delay = 0.5
    stack.upstream.stream_chunks = 40  # 20 s if nobody ends it
    response = await http.post(sidecar.url + CHAT, data=STREAM_BODY)
    assert response.status == 200
    await response.content.readany()  # the first event is here; now the caller goes away
    left_at = time.monotonic()
    response.close()
    # the upstream's stream ends long before its natural end (a sidecar that read on would end it at 20 s)
    await asyncio.wait_for(stack.upstream.stream_closed_early_event.wait(), timeout=10)
    assert stack.upstream.stream_closed_early_at is not None
    assert stack.upstream.stream_closed_early_at - left_at < 10
    assert stack.upstream.streams_closed_early == 1


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
