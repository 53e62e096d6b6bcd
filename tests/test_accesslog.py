"""The access log (sidecar/accesslog.py): one line per request through the sidecar, in the text and JSON formats
`serve` writes, with the fields operators search for; and the batching that writes those lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from typing import Any

import aiohttp
import pytest
from harness import BODY, CHAT, STREAM_BODY, StartSidecar, config_for, configured_logging, until, wait_ready

from sidecar.accesslog import batch_access_log
from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack

MODELS = "/openai/models?api-version=2024-06-01"


async def traffic(running: RunningSidecar) -> dict[str, bytes]:
    """A chat, a stream, a refused path, a 404, a probe and an upstream error; returns the bodies callers got."""
    got: dict[str, bytes] = {}
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        headers = {"x-ms-client-request-id": "req-chat", "Content-Type": "application/json"}
        async with http.post(running.url + CHAT, data=BODY, headers=headers) as response:
            got["chat"] = await response.read()
        async with http.post(running.url + CHAT, data=STREAM_BODY, headers={"x-request-id": "req-stream"}) as response:
            got["stream"] = await response.read()
        async with http.get(running.url + "/nowhere") as response:
            got["404"] = await response.read()
        async with http.get(running.url + "/healthz") as response:  # the sidecar's own routes are not logged
            await response.read()
        async with http.get(running.url + MODELS) as response:  # the upstream's 500, scripted below
            got["500"] = await response.read()
    return got


@pytest.fixture
async def running(stack: Stack, run_sidecar: StartSidecar) -> RunningSidecar:
    sidecar = await run_sidecar(config_for(stack))
    await wait_ready(sidecar)
    stack.upstream.script(Scripted(status=500, body=b'{"error": "boom"}', match="/models"))
    return sidecar


async def test_text_lines(running: RunningSidecar) -> None:
    with configured_logging("text") as out:
        await traffic(running)
    access = [line for line in out.getvalue().splitlines() if " sidecar.access: " in line]
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    sidecar\.access: "
    ids = r" apim_request_id=[0-9a-f-]{36} upstream_request_id=[0-9a-f-]{36} region=Sweden Central"
    expected = [  # method, route, status, duration, then key=value fields ("-" when absent)
        rf"POST chat\.completions 200 \d+\.\dms ttfb=\d+\.\dms in=\d+ out=\d+ backend=0 request_id=req-chat{ids}",
        rf"POST chat\.completions 200 \d+\.\dms ttfb=\d+\.\dms in=\d+ out=\d+ backend=0 request_id=req-stream{ids}",
        r"GET not_found 404 \d+\.\dms ttfb=- in=0 out=0 backend=- request_id=- apim_request_id=- "
        r"upstream_request_id=- region=-",  # answered by the sidecar: nothing went upstream
        rf"GET models 500 \d+\.\dms ttfb=\d+\.\dms in=0 out=\d+ backend=0 request_id=-{ids}",
    ]
    assert len(access) == len(expected), access
    for line, pattern in zip(access, expected, strict=True):
        assert re.fullmatch(stamp + pattern, line), line


async def test_json_lines(running: RunningSidecar) -> None:
    with configured_logging("json") as out:
        got = await traffic(running)
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    access = [e for e in entries if e["logger"] == "sidecar.access"]

    def fields(entry: dict[str, Any]) -> tuple[Any, ...]:
        names = ("method", "route", "request_id", "status", "upstream_status", "bytes_in", "bytes_out")
        return tuple(entry[name] for name in names)

    assert [fields(e) for e in access] == [
        ("POST", "chat.completions", "req-chat", 200, 200, len(BODY), len(got["chat"])),
        ("POST", "chat.completions", "req-stream", 200, 200, len(STREAM_BODY), len(got["stream"])),
        ("GET", "not_found", None, 404, None, 0, 0),  # answered by the sidecar: nothing went upstream
        ("GET", "models", None, 500, 500, 0, len(got["500"])),
    ]
    assert len(got["stream"]) > len(got["chat"]) > 0
    for entry in access:
        assert entry["level"] == "info"
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0
        assert entry["message"].startswith(f"{entry['method']} {entry['route']} ")


async def test_no_lines_when_the_access_log_is_off(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack, logging={"access_log": False}))
    await wait_ready(running)
    with configured_logging("text") as out:
        await traffic(running)
    assert " sidecar.access: " not in out.getvalue()


def access_record(n: int, message: str = "") -> logging.LogRecord:
    return logging.LogRecord("sidecar.access", logging.INFO, __file__, 0, f"line {n}{message}", None, None)


async def test_batched_lines_are_written_together_scrubbed_and_flushed_on_undo() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzb21lb25lIn0.c2lnbmF0dXJlLWJ5dGVz"
    with configured_logging("text", secrets=["the-client-secret"]) as out:
        writes: list[str] = []
        real_write = out.write

        def counting_write(text: str) -> int:
            writes.append(text)
            return real_write(text)

        out.write = counting_write  # type: ignore[method-assign]
        undo = batch_access_log(asyncio.get_running_loop())
        logger = logging.getLogger("sidecar.access")
        try:
            for n in range(50):  # no await in between: one batch
                logger.handle(access_record(n, f" {token} the-client-secret" if n == 7 else ""))
            assert out.getvalue() == ""  # not yet: the batch leaves on the loop's next timer
            await until(lambda: out.getvalue().count("\n") == 50, what="the batch")
            assert len(writes) == 1
            assert [line.rsplit(": ", 1)[1] for line in out.getvalue().splitlines()][:8] == [
                *(f"line {n}" for n in range(7)),
                "line 7 [redacted-jwt] [redacted]",  # the handler it stands in for redacts: so does the batch
            ]
            # a batch past 64 KiB leaves at once, without waiting for the timer
            for n in range(100):
                logger.handle(access_record(n, " " + "x" * 1000))
            assert len(writes) == 2
            logger.handle(access_record(999))
        finally:
            undo()
        assert out.getvalue().endswith("line 999\n")  # undo flushed what was pending
    assert logger.propagate and not logger.handlers  # and handed the lines back to the root's handler


async def test_batching_stays_out_of_a_logging_set_up_it_does_not_know() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    extra = logging.StreamHandler(stream)  # a second root handler: not sidecar.logs.configure()'s set-up
    root.addHandler(extra)
    try:
        undo = batch_access_log(asyncio.get_running_loop())
        assert not logging.getLogger("sidecar.access").handlers
        undo()
    finally:
        root.removeHandler(extra)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_token_or_secret_in_a_request_id_never_reaches_the_log(
    fmt: str, stack: Stack, running: RunningSidecar
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzb21lb25lIn0.c2lnbmF0dXJlLWJ5dGVz"  # a caller's mistake, or a probe
    with configured_logging(fmt, secrets=[stack.client_secret]) as out:
        async with aiohttp.ClientSession() as http:
            for headers in ({"x-ms-client-request-id": token}, {"x-request-id": f"Bearer {stack.client_secret}"}):
                async with http.post(running.url + CHAT, data=BODY, headers=headers) as response:
                    assert response.status == 200
    assert out.getvalue().count("sidecar.access") == 2
    assert "eyJ" not in out.getvalue() and stack.client_secret not in out.getvalue()
