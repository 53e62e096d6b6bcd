"""The secured upstream: authentication, recording, OpenAI shapes (via the openai SDK), scripted faults."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from emu_support import DEMO_API
from harness import until

from sidecar_emulators import EntraEmulator, Scripted, UpstreamEmulator
from sidecar_emulators.keys import SigningKey

API_VERSION = "2024-10-21"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions"


@pytest.fixture
def token(entra: EntraEmulator) -> str:
    return entra.mint_app_token(client_id="caller-app", oid="caller-oid", audience=DEMO_API)[0]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress=False: tests look at the bytes on the wire.
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post_chat(
    session: aiohttp.ClientSession, upstream: UpstreamEmulator, token: str, **body: object
) -> aiohttp.ClientResponse:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    return await session.post(f"{upstream.url}{CHAT}?api-version={API_VERSION}", json=payload, headers=bearer(token))


# ---- authentication ----


def forged(entra: EntraEmulator, **overrides: object) -> str:
    """A token signed with the real tenant key, with some claims wrong."""
    claims = entra.mint_app_token(client_id="caller-app", oid="o", audience=DEMO_API)[1]
    return entra.sign({**claims, **overrides})


@pytest.mark.parametrize(
    "make_headers",
    [
        pytest.param(lambda entra: {}, id="missing"),
        pytest.param(lambda entra: {"Authorization": "Basic dXNlcjpwYXNz"}, id="basic"),
        pytest.param(lambda entra: bearer("not-a-jwt"), id="garbage"),
        pytest.param(lambda entra: bearer(forged(entra, aud="api://other")), id="wrong-audience"),
        pytest.param(lambda entra: bearer(forged(entra, iss="https://evil/v2.0")), id="wrong-issuer"),
        pytest.param(lambda entra: bearer(forged(entra, exp=int(time.time()) - 5)), id="expired"),
        pytest.param(
            lambda entra: bearer(SigningKey().sign(entra.mint_app_token(client_id="c", oid="o", audience=DEMO_API)[1])),
            id="unknown-key",
        ),
    ],
)
async def test_bad_tokens_get_401_with_empty_body(
    upstream: UpstreamEmulator, entra: EntraEmulator, session: aiohttp.ClientSession, make_headers: object
) -> None:
    headers = make_headers(entra)  # type: ignore[operator]
    async with session.post(f"{upstream.url}{CHAT}", json={}, headers=headers) as response:
        assert response.status == 401
        assert await response.read() == b""
    assert upstream.requests[-1].claims is None


async def test_user_token_from_entra_is_accepted(
    upstream: UpstreamEmulator, entra: EntraEmulator, session: aiohttp.ClientSession
) -> None:
    user_token = entra.issue_user_token("carol@contoso.example", "some-client", DEMO_API)
    async with await post_chat(session, upstream, user_token) as response:
        assert response.status == 200
    assert upstream.requests[-1].claims is not None
    assert upstream.requests[-1].claims["preferred_username"] == "carol@contoso.example"


async def test_two_authorization_headers_get_400(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    async with session.post(f"{upstream.url}{CHAT}", json={}, headers=headers) as response:
        assert response.status == 400
    assert upstream.requests[-1].headers.getall("Authorization") == [f"Bearer {token}"] * 2


# ---- recording and shapes ----


async def test_records_raw_path_headers_and_body(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    raw_path = f"/api{CHAT}?api-version={API_VERSION}&odd=%2F%20a+b&dup=1&dup=2"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = [*bearer(token).items(), ("X-Trace", "one"), ("X-Trace", "two"), ("Content-Type", "application/json")]
    url = upstream.url.removesuffix("/api") + raw_path
    async with session.post(aiohttp.client.URL(url, encoded=True), data=body, headers=headers) as response:
        answer = await response.json()
    recorded = upstream.requests[-1]
    assert recorded.method == "POST"
    assert recorded.path_qs == raw_path
    assert recorded.headers.getall("X-Trace") == ["one", "two"]
    assert recorded.body_sha256 == hashlib.sha256(body).hexdigest()
    assert recorded.body_size == len(body)
    assert recorded.claims is not None and recorded.claims["appid"] == "caller-app"
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == (
        f"hello from upstream; aud={DEMO_API} oid=caller-oid appid=caller-app"
    )


async def test_gzip_request_body_is_recorded_raw(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    compressed = gzip.compress(json.dumps({"messages": [], "stream": False}).encode())
    headers = {**bearer(token), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with session.post(f"{upstream.url}{CHAT}", data=compressed, headers=headers) as response:
        assert response.status == 200
    assert upstream.requests[-1].body_sha256 == hashlib.sha256(compressed).hexdigest()
    assert upstream.requests[-1].body == compressed


async def test_sse_stream_shape_and_pacing(entra: EntraEmulator, token: str, session: aiohttp.ClientSession) -> None:
    async with UpstreamEmulator(
        jwks=entra.jwks, issuer=entra.issuer, audience=DEMO_API, stream_chunks=3, stream_delay=0.05
    ) as upstream:
        async with await post_chat(session, upstream, token, stream=True) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.read()
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len(chunks) == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text.startswith("hello from upstream; aud=api://sidecar-demo-api")
    gaps = [b - a for a, b in zip(upstream.stream_events, upstream.stream_events[1:], strict=False)]
    assert len(upstream.stream_events) == 4  # 3 chunks + [DONE]
    assert all(gap >= 0.04 for gap in gaps)


async def test_client_disconnect_during_stream_is_noticed(
    entra: EntraEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    async with UpstreamEmulator(
        jwks=entra.jwks, issuer=entra.issuer, audience=DEMO_API, stream_chunks=400, stream_delay=0.05
    ) as upstream:
        response = await post_chat(session, upstream, token, stream=True)
        await response.content.readuntil(b"\n\n")
        closed_at = time.monotonic()
        response.close()  # drops the connection mid-stream
        # noticed long before the stream's natural end (20 s)
        await asyncio.wait_for(upstream.stream_closed_early_event.wait(), 10)
        assert upstream.streams_closed_early == 1
        assert upstream.stream_closed_early_at is not None
        assert upstream.stream_closed_early_at - closed_at < 10


async def test_not_found_routes(upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{upstream.url}/openai/unknown", headers=bearer(token)) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "404"


# ---- the openai SDK against the emulator ----


async def test_openai_sdk_azure_client(upstream: UpstreamEmulator, token: str) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=upstream.url, api_version=API_VERSION, azure_ad_token_provider=lambda: token
    ) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert "appid=caller-app" in (completion.choices[0].message.content or "")

        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p or "" for p in pieces) == completion.choices[0].message.content

        embedding = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert len(embedding.data) == 2
        assert len(embedding.data[0].embedding) == 8  # base64 on the wire, decoded by the SDK
        assert all(-1.0 <= x <= 1.0 for x in embedding.data[0].embedding)

        audio = b"RIFF\x00\x01\r\n\r\n--not-a-boundary\x00" * 1000
        transcription = await client.audio.transcriptions.create(model="whisper", file=("clip.wav", audio, "audio/wav"))
        assert transcription.text == f"sha256={hashlib.sha256(audio).hexdigest()} size={len(audio)}"

        models = await client.models.list()
        assert "gpt-4o-mini" in [m.id async for m in models]
    paths = [r.path_qs.split("?")[0] for r in upstream.requests]
    assert "/api/openai/deployments/gpt-4o-mini/chat/completions" in paths
    assert "/api/openai/deployments/whisper/audio/transcriptions" in paths


async def test_openai_sdk_v1_routes(upstream: UpstreamEmulator, token: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{upstream.url}/openai/v1", api_key=token) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.model == "gpt-4o-mini"
        embedding = await client.embeddings.create(model="text-embedding-3-small", input="x", dimensions=4)
        assert len(embedding.data[0].embedding) == 4
        assert [m.id async for m in await client.models.list()] == list(upstream.models)
    assert upstream.requests[0].path_qs == "/api/openai/v1/chat/completions"


# ---- scripted behaviours ----


async def test_scripted_401_once(upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession) -> None:
    upstream.script(Scripted.unauthorized())
    async with await post_chat(session, upstream, token) as response:
        assert response.status == 401
        assert await response.read() == b""
    async with await post_chat(session, upstream, token) as response:
        assert response.status == 200


async def test_scripted_429_headers(upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession) -> None:
    upstream.script(Scripted.rate_limited(2.5, remaining_requests=0, remaining_tokens=17))
    async with await post_chat(session, upstream, token) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
        assert response.headers["retry-after-ms"] == "2500"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["x-ratelimit-remaining-tokens"] == "17"
        assert (await response.json())["error"]["code"] == "429"


async def test_scripted_gzip_response(upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession) -> None:
    scripted = Scripted.gzip_json({"hello": "gzip"})
    upstream.script(scripted)
    async with await post_chat(session, upstream, token) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        wire = await response.read()
    assert wire == scripted.wire_body
    assert json.loads(gzip.decompress(wire)) == {"hello": "gzip"}


async def test_scripted_redirect(upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession) -> None:
    upstream.script(Scripted.redirect("http://127.0.0.1:9/elsewhere"))
    async with session.post(f"{upstream.url}{CHAT}", json={}, headers=bearer(token), allow_redirects=False) as response:
        assert response.status == 307
        assert response.headers["Location"] == "http://127.0.0.1:9/elsewhere"


async def test_scripted_stream_reset_after_bytes(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    upstream.script(Scripted.stream_reset(40))
    received = b""
    async with await post_chat(session, upstream, token, stream=True) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert len(received) == 40
    assert received.startswith(b"data: {")
    assert upstream.streams_closed_early == 0  # a server-side reset is not a client disconnect


async def test_scripted_custom_sse_events(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    upstream.script(Scripted(sse_events=[{"a": 1}, b": comment\n\n", "[DONE]"], match="/chat/"))
    async with await post_chat(session, upstream, token, stream=True) as response:
        assert await response.read() == b'data: {"a":1}\n\n: comment\n\ndata: [DONE]\n\n'


async def test_scripted_match_skips_other_paths(
    upstream: UpstreamEmulator, token: str, session: aiohttp.ClientSession
) -> None:
    upstream.script(Scripted(status=503, match="/embeddings"))
    async with await post_chat(session, upstream, token) as response:
        assert response.status == 200
    assert len(upstream.pending_script) == 1


async def test_hang_and_fast_stop(entra: EntraEmulator, token: str, session: aiohttp.ClientSession) -> None:
    upstream = UpstreamEmulator(jwks=entra.jwks, issuer=entra.issuer, audience=DEMO_API, stream_delay=10)
    await upstream.start()
    upstream.script(Scripted(hang=True))
    hanging = asyncio.create_task(post_chat(session, upstream, token))
    streaming = asyncio.create_task(post_chat(session, upstream, token, stream=True))
    await until(lambda: len(upstream.requests) >= 2, what="both requests at the emulator")
    await asyncio.sleep(0.05)
    assert not hanging.done()  # (a negative check: a slow machine can only miss an early answer)
    started = time.monotonic()
    await upstream.stop()
    assert time.monotonic() - started < 5  # handlers cut off: the stream had 10 s to go, the hang forever
    with pytest.raises(aiohttp.ClientError):
        await hanging
    stream_response = await streaming
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream_response.read()
    stream_response.close()
    assert upstream.streams_closed_early == 0  # stopping is not a client disconnect
