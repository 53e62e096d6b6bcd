"""What the metrics and the access log record is what the caller got: a response whose status and whole body
were delivered keeps its status whatever the caller does afterwards; 499 only for a caller that left early."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from harness import StartSidecar, config_for, wait_ready
from openai import AzureOpenAI

from sidecar.app import METRICS
from sidecar.logs import JsonFormatter
from sidecar_emulators import Stack


def statuses(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [record.status for record in caplog.records if record.name == "sidecar.access"]  # type: ignore[attr-defined]


async def test_complete_sdk_streams_are_never_recorded_as_499(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """The openai SDK hangs up right after `data: [DONE]`, before the response's final chunk terminator:
    main cancelled the handler then and recorded 499 for some healthy streams (7 of 30 here)."""
    caplog.set_level(logging.INFO, logger="sidecar.access")
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)

    def thirty_streams() -> None:  # the sync SDK in its own thread, as an application would run it
        with AzureOpenAI(
            azure_endpoint=running.url, api_key="unused", api_version="2024-06-01", max_retries=0
        ) as client:
            for _ in range(30):
                stream = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                assert [chunk for chunk in stream]

    await asyncio.to_thread(thirty_streams)
    await asyncio.sleep(0.3)  # the last handler's accounting runs when the caller's hang-up is noticed
    metrics = running.app[METRICS]
    recorded = {key: count for key, count in metrics.requests.items() if key[2] == "chat.completions"}
    assert recorded == {("POST", 200, "chat.completions"): 30}
    assert statuses(caplog).count(200) == 30 and 499 not in statuses(caplog)


async def test_a_caller_that_leaves_mid_stream_is_499(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.access")
    stack.upstream.stream_delay = 0.2
    stack.upstream.stream_chunks = 10
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + path, json={"messages": [], "stream": True}) as response:
            assert response.status == 200
            await response.content.readline()  # the first event, then leave
    for _ in range(100):
        if 499 in statuses(caplog):
            break
        await asyncio.sleep(0.05)
    assert statuses(caplog) == [499]
    assert running.app[METRICS].requests == {("POST", 499, "chat.completions"): 1}


async def test_the_access_line_carries_the_callers_and_the_upstreams_ids(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Microsoft support asks for apim-request-id, x-request-id and the region: they are in the line, text and
    JSON, beside the caller's own id, the time to first byte and the bytes each way."""
    caplog.set_level(logging.INFO, logger="sidecar.access")
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)
    path = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url + path, json={"messages": []}, headers={"x-request-id": "caller-7"}) as r:
            assert r.status == 200
            body = await r.read()
            apim, upstream_id = r.headers["apim-request-id"], r.headers["x-request-id"]
    for _ in range(100):
        records = [record for record in caplog.records if record.name == "sidecar.access"]
        if records:
            break
        await asyncio.sleep(0.02)
    (record,) = records
    text = record.getMessage()
    assert text.startswith("POST chat.completions 200 ")
    for part in ("request_id=caller-7", f"apim_request_id={apim}", f"upstream_request_id={upstream_id}",
                 "region=Sweden Central", f"out={len(body)}", "ttfb=", "backend=0"):  # fmt: skip
        assert part in text, (part, text)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "caller-7" and entry["apim_request_id"] == apim
    assert entry["upstream_request_id"] == upstream_id and entry["region"] == "Sweden Central"
    assert entry["bytes_out"] == len(body) and entry["ttfb_ms"] > 0 and entry["status"] == 200
    assert entry["backend"] == "0"  # the one backend of the /openai/ route, by its index
