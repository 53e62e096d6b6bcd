"""The proxy as applications use it: the real openai SDK (sync and async) through the sidecar."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time

import openai
import pytest
from harness import API_VERSION, StartSidecar, config_for
from openai import AsyncAzureOpenAI, AzureOpenAI

from sidecar.claims import unverified_claims
from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack

AUDIO = bytes(range(256)) * 4096 + b"\x00tail\xff"  # 1 MiB + a few bytes, every byte value


def async_client(sidecar: RunningSidecar, **kwargs: object) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(
        azure_endpoint=sidecar.url, api_key="caller-key-must-not-leak", api_version=API_VERSION, **kwargs
    )


def sync_client(sidecar: RunningSidecar, **kwargs: object) -> AzureOpenAI:
    return AzureOpenAI(
        azure_endpoint=sidecar.url, api_key="caller-key-must-not-leak", api_version=API_VERSION, **kwargs
    )


def assert_upstream_saw_only_our_token(stack: Stack) -> None:
    assert stack.upstream.requests
    for seen in stack.upstream.requests:
        assert seen.headers.getall("Authorization") == [seen.headers["Authorization"]]
        assert seen.headers["Authorization"].startswith("Bearer ")
        assert seen.claims is not None and seen.claims["aud"] == stack.audience
        assert seen.claims["appid"] == stack.client_id
        assert "api-key" not in seen.headers


async def test_async_sdk_chat_stream_embeddings_transcription(stack: Stack, sidecar: RunningSidecar) -> None:
    client = async_client(sidecar)
    chat = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert "hello from upstream" in (chat.choices[0].message.content or "")
    assert f"aud={stack.audience}" in (chat.choices[0].message.content or "")

    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "hello from upstream" in "".join(pieces)

    embedding = await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert len(embedding.data[0].embedding) > 0

    transcription = await client.audio.transcriptions.create(
        model="whisper", file=("speech.wav", io.BytesIO(AUDIO), "audio/wav")
    )
    assert transcription.text == f"sha256={hashlib.sha256(AUDIO).hexdigest()} size={len(AUDIO)}"
    await client.close()

    paths = [r.path_qs for r in stack.upstream.requests]
    assert all(p.startswith("/api/openai/deployments/") for p in paths)  # upstream base path kept
    assert all(f"api-version={API_VERSION}" in p for p in paths)
    assert_upstream_saw_only_our_token(stack)


async def test_sync_sdk_through_the_sidecar(stack: Stack, sidecar: RunningSidecar) -> None:
    def calls() -> tuple[str, list[str], int, str]:
        with sync_client(sidecar) as client:
            chat = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                extra_query={"tag": ["a", "b"], "empty": ""},
            )
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
            text = client.audio.transcriptions.create(model="whisper", file=("a.mp3", AUDIO, "audio/mpeg")).text
            return chat.choices[0].message.content or "", pieces, len(embedding.data), text

    # the sync SDK blocks: run it in a thread so this loop keeps serving the sidecar and the emulators
    content, pieces, embeddings, text = await asyncio.to_thread(calls)
    assert "hello from upstream" in content
    assert pieces
    assert embeddings == 2
    assert text == f"sha256={hashlib.sha256(AUDIO).hexdigest()} size={len(AUDIO)}"
    first = stack.upstream.requests[0].path_qs
    # exactly the caller's bytes: repeated keys, their percent-encoding, the empty value
    path = "/api/openai/deployments/gpt-4o-mini/chat/completions"
    assert first == f"{path}?api-version={API_VERSION}&tag%5B%5D=a&tag%5B%5D=b&empty="
    assert_upstream_saw_only_our_token(stack)


async def test_v1_api_with_plain_openai_client(stack: Stack, sidecar: RunningSidecar) -> None:
    client = openai.AsyncOpenAI(base_url=sidecar.url + "/openai/v1/", api_key="unused")
    chat = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert "hello from upstream" in (chat.choices[0].message.content or "")
    await client.close()
    assert stack.upstream.requests[0].path_qs == "/api/openai/v1/chat/completions"
    assert_upstream_saw_only_our_token(stack)


async def test_stream_is_not_buffered(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.stream_delay = 0.4
    stack.upstream.stream_chunks = 5
    client = async_client(sidecar)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    # how many events the upstream had sent when each chunk reached the caller: the emulator's own count, so
    # the check holds however slowly a busy machine runs both ends
    sent_at_arrival = [len(stack.upstream.stream_events) async for _chunk in stream]
    await client.close()
    total_events = len(stack.upstream.stream_events)
    # the caller held the first event while the upstream was still sending ...
    assert sent_at_arrival[0] < total_events
    # ... and the later ones as they came: chunks held back and sent in a batch would reach the caller at one or
    # two upstream states, not at one per event (0.4 s apart)
    assert len(set(sent_at_arrival)) >= 3, sent_at_arrival


async def test_rate_limit_headers_reach_the_caller(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted.rate_limited(7, remaining_requests=0, remaining_tokens=12))
    client = async_client(sidecar, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    headers = caught.value.response.headers
    assert headers["retry-after"] == "7"
    assert headers["retry-after-ms"] == "7000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == "12"
    assert caught.value.status_code == 429


async def test_reset_mid_stream_is_an_error_not_a_clean_end(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted.stream_reset(after_bytes=200))
    client = async_client(sidecar, max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    # the sidecar cuts the caller's connection: the SDK sees a broken response, not a clean end of the stream
    with pytest.raises(openai.APIConnectionError):
        async for _chunk in stream:
            pass
    await client.close()


async def test_cold_start_burst_makes_one_token_request(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack))  # not waiting for readiness: the burst races the first token
    client = async_client(running)

    async def call() -> str:
        answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        return answer.choices[0].message.content or ""

    first = await asyncio.gather(*(call() for _ in range(100)))
    second = await asyncio.gather(*(call() for _ in range(100)))
    await client.close()
    assert all("hello from upstream" in answer for answer in first + second)
    assert stack.entra.token_requests == 1
    assert len(stack.upstream.requests) == 200


async def test_upstream_401_once_refreshes_and_replays(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted.unauthorized())
    client = async_client(sidecar, max_retries=0)
    answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    assert "hello from upstream" in (answer.choices[0].message.content or "")
    assert stack.entra.token_requests == 2
    rejected, replayed = stack.upstream.requests
    assert rejected.body_sha256 == replayed.body_sha256
    assert rejected.headers["Authorization"] != replayed.headers["Authorization"]


async def test_short_lived_tokens_rotate_without_a_single_failure(stack: Stack, run_sidecar: StartSidecar) -> None:
    stack.entra.token_lifetime = 8  # renewed at half-life: a new token every ~4 s
    running = await run_sidecar(config_for(stack, auth={"refresh_margin": 5}))
    client = async_client(running, max_retries=0)
    statuses: list[int] = []

    def tokens() -> set[str]:
        return {r.headers["Authorization"] for r in stack.upstream.requests}

    def rotated() -> bool:
        # Five tokens carried requests, and the identity provider was asked exactly once for each: a token
        # request that gave no token the upstream saw (a wasted call) would keep the counts apart for good.
        # Compared between requests, so a renewal in flight only means one more request.
        return len(tokens()) >= 5 and stack.entra.token_requests == len(tokens())

    deadline = time.monotonic() + 90  # ~16 s when all is well
    while not rotated():
        assert time.monotonic() < deadline, f"{stack.entra.token_requests} token requests, {len(tokens())} tokens used"
        response = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        statuses.append(response.status_code)
        await asyncio.sleep(0.05)
    await client.close()
    # the upstream checks exp on every request (401 otherwise): all 200 means no expired token was sent
    assert set(statuses) == {200}
    assert len(statuses) >= 5 * len(tokens())  # requests kept coming through every token's life
    assert all(unverified_claims(t.split()[1])["aud"] == stack.audience for t in tokens())
