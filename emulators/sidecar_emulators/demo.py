"""`sidecar demo`: the whole product offline. Local Entra ID + secured upstream emulators, the sidecar in
front of them, and the real openai SDK going through it. Exit 0 only if every step worked."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from openai import AsyncAzureOpenAI

from sidecar.config import Settings
from sidecar.server import start
from sidecar_emulators import start_stack

API_VERSION = "2024-06-01"


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _wait_ready(url: str) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        while True:
            async with session.get(url + "/readyz") as response:
                if response.status == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.02)


async def run_demo(chunk_delay: float = 0.15) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        stack = await start_stack(Path(tmp), stream_delay=chunk_delay, stream_chunks=8)
        try:
            settings = Settings(**stack.sidecar_config())
            sidecar = await start(settings)
            try:
                return await _drive(sidecar.url, stack, settings)
            finally:
                await sidecar.aclose()
        finally:
            await stack.aclose()


async def _drive(url: str, stack: object, settings: Settings) -> int:
    from sidecar_emulators import Stack

    assert isinstance(stack, Stack)
    _say("sidecar demo — everything runs on loopback, offline")
    _say(f"  Entra ID emulator   {stack.authority_host}  (HTTPS, test CA)")
    _say(f"  secured upstream    {stack.upstream_url}  (accepts only Entra tokens for {stack.audience})")
    _say(f"  sidecar             {url}  (flow client_credentials, client {stack.client_id})")
    ready_after = await _wait_ready(url)
    _say(f"  sidecar ready after {ready_after * 1000:.0f} ms (first token fetched in the background)")
    _say()

    client = AsyncAzureOpenAI(azure_endpoint=url, api_key="not-a-secret-the-sidecar-drops-it", api_version=API_VERSION)
    failures = 0

    async def step(title: str, action: Callable[[], Awaitable[None]]) -> None:
        nonlocal failures
        _say(f"▶ {title}")
        try:
            await action()
        except Exception as exc:
            failures += 1
            _say(f"  ✗ failed: {type(exc).__name__}: {exc}")
        _say()

    async def chat() -> None:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello from the sidecar demo!"}]
        )
        _say(f"  {answer.choices[0].message.content}")

    async def streamed_chat() -> None:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Stream, please"}], stream=True
        )
        sys.stdout.write("  ")
        chunks = 0
        async for event in stream:
            for choice in event.choices:
                if choice.delta.content:
                    chunks += 1
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
        _say(f"\n  ({chunks} chunks in {time.monotonic() - started:.2f} s, each printed as it arrived)")
        if chunks == 0:
            raise RuntimeError("no streamed content arrived")

    async def embedding() -> None:
        result = await client.embeddings.create(model="text-embedding-3-small", input="sidecar")
        vector = result.data[0].embedding
        _say(f"  {len(vector)} dimensions: [{', '.join(f'{x:.3f}' for x in vector[:4])}, ...]")

    await step("chat completion (AzureOpenAI → sidecar → upstream)", chat)
    await step("streamed chat completion", streamed_chat)
    await step("embedding", embedding)
    await client.close()

    _say("▶ what the upstream saw")
    seen = stack.upstream.requests
    api_keys = sum(1 for r in seen if "api-key" in r.headers)
    authorizations = {len(r.headers.getall("Authorization", [])) for r in seen}
    audiences = sorted({str((r.claims or {}).get("aud")) for r in seen})
    _say(
        f"  {len(seen)} requests; token audience {', '.join(audiences)}; app id "
        f"{', '.join(sorted({str((r.claims or {}).get('appid')) for r in seen}))}"
    )
    _say(f"  Authorization headers per request: {sorted(authorizations)}; requests carrying an api-key: {api_keys}")
    _say(f"  identity-provider token requests: {stack.entra.token_requests}")
    if api_keys or authorizations != {1} or audiences != [stack.audience] or len(seen) != 3:
        failures += 1
        _say("  ✗ the upstream did not see exactly what it should")
    _say()
    _say("demo passed" if not failures else f"demo FAILED: {failures} step(s)")
    return 0 if not failures else 1
