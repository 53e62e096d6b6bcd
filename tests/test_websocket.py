"""WebSockets through the sidecar (the Realtime API): the real openai SDK's realtime clients for both URL shapes,
aiohttp's client where a test needs to choose close codes, pings or its reading pace, and raw sockets for what
an attacker would send. The upstream emulator's realtime endpoint records what each session saw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import aiohttp
import openai
import pytest
import websockets
from harness import JWT, StartSidecar, config_for, start_serve, stop_serve, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from sidecar.claims import unverified_claims
from sidecar.server import RunningSidecar
from sidecar_emulators import Scripted, Stack
from sidecar_emulators.upstream import RealtimeSession


@pytest.fixture(autouse=True)
def quiet_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test sends, the sidecar logs no error, no traceback, and none of aiohttp's WebSocket warnings
    (they quote the caller's subprotocols, which may hold a key)."""
    caplog.set_level(logging.INFO)
    yield
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.exc_info or (r.name == "aiohttp.websocket" and r.levelno >= logging.WARNING)
    ]
    assert not loud, [r.getMessage() for r in loud]


PREVIEW_API_VERSION = "2025-04-01-preview"
PREVIEW = f"/openai/realtime?api-version={PREVIEW_API_VERSION}&deployment=gpt-4o-realtime-preview"
GA = "/openai/v1/realtime?model=gpt-realtime"
CALLER_KEY = "caller-key-must-not-leak"


def ws_url(sidecar: RunningSidecar) -> str:
    return sidecar.url.replace("http://", "ws://", 1)


def azure_client(sidecar: RunningSidecar, **kwargs: object) -> openai.AsyncAzureOpenAI:
    # the SDK derives wss:// from azure_endpoint; the plain-HTTP sidecar needs websocket_base_url
    options: dict[str, object] = {"api_key": CALLER_KEY, **kwargs}
    return openai.AsyncAzureOpenAI(
        azure_endpoint=sidecar.url,
        api_version=PREVIEW_API_VERSION,
        websocket_base_url=ws_url(sidecar) + "/openai",
        **options,  # type: ignore[arg-type]
    )


def v1_client(sidecar: RunningSidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sidecar.url + "/openai/v1", api_key=CALLER_KEY)


async def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def assert_upstream_saw_only_our_token(stack: Stack, session: RealtimeSession) -> None:
    """Exactly one Authorization, ours; no api key in a header, the query or a subprotocol."""
    headers = session.headers
    assert headers.getall("Authorization") == [headers["Authorization"]]
    scheme, _, token = headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    claims = unverified_claims(token)
    assert claims["aud"] == stack.audience and claims["appid"] == stack.client_id
    assert "api-key" not in headers
    assert CALLER_KEY not in json.dumps(list(headers.items()))
    query = session.path_qs.partition("?")[2]
    assert all(unquote_plus(pair.partition("=")[0]).lower() != "api-key" for pair in query.split("&"))
    assert CALLER_KEY not in session.path_qs
    assert not any(p.lower().startswith("openai-insecure-api-key") for p in session.offered_protocols)


async def converse(connection: object, *, ga: bool) -> tuple[list[str], str]:
    """A text turn with the SDK's connection: the event types seen and the text streamed back."""
    session = {"type": "realtime", "output_modalities": ["text"]} if ga else {"modalities": ["text"]}
    await connection.session.update(session=session)  # type: ignore[attr-defined]
    await connection.conversation.item.create(  # type: ignore[attr-defined]
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    )
    await connection.response.create()  # type: ignore[attr-defined]
    types: list[str] = []
    text = ""
    async for event in connection:  # type: ignore[attr-defined]
        types.append(event.type)
        if event.type.endswith("text.delta"):
            text += event.delta
        if event.type == "response.done":
            break
    return types, text


# ---- the openai SDK, both URL shapes --------------------------------------------------------------------------


async def test_sdk_realtime_preview_url_through_the_sidecar(stack: Stack, sidecar: RunningSidecar) -> None:
    client = azure_client(sidecar)
    async with client.realtime.connect(
        model="gpt-4o-realtime-preview",
        extra_query={"api-key": CALLER_KEY},  # the browser way to send a key: must not travel on
        websocket_connection_options={"subprotocols": ["openai-insecure-api-key." + CALLER_KEY, "realtime"]},
    ) as connection:
        types, text = await converse(connection, ga=False)
    await client.close()

    assert types[0] == "session.created"
    assert "response.text.delta" in types and types[-1] == "response.done"
    assert f"hello from upstream; aud={stack.audience}" in text
    (session,) = stack.upstream.realtime.sessions
    await asyncio.wait_for(session.closed.wait(), 10)
    assert session.path_qs.startswith("/api/openai/realtime?")  # upstream base path kept
    assert f"api-version={PREVIEW_API_VERSION}" in session.path_qs
    assert "deployment=gpt-4o-realtime-preview" in session.path_qs
    assert session.offered_protocols == ["realtime"] and session.protocol == "realtime"
    assert session.event_types == ["session.update", "conversation.item.create", "response.create"]
    assert session.close_code == 1000  # the SDK's close, passed on
    assert_upstream_saw_only_our_token(stack, session)
    assert stack.upstream.requests[-1].claims is not None  # the emulator verified the token on the handshake


async def test_sdk_realtime_ga_url_through_the_sidecar(stack: Stack, sidecar: RunningSidecar) -> None:
    client = v1_client(sidecar)  # the plain client derives ws:// from its http:// base_url
    async with client.realtime.connect(model="gpt-realtime") as connection:
        types, text = await converse(connection, ga=True)
    await client.close()

    assert types[0] == "session.created"
    assert "conversation.item.added" in types and "response.output_text.delta" in types
    assert f"hello from upstream; aud={stack.audience}" in text
    (session,) = stack.upstream.realtime.sessions
    await asyncio.wait_for(session.closed.wait(), 10)
    assert session.path_qs == "/api/openai/v1/realtime?model=gpt-realtime"  # no api-version added
    assert session.close_code == 1000
    assert_upstream_saw_only_our_token(stack, session)


async def test_sdk_beta_realtime_both_shapes(stack: Stack, sidecar: RunningSidecar) -> None:
    azure = azure_client(sidecar)
    async with azure.beta.realtime.connect(model="gpt-4o-realtime-preview") as connection:
        types, text = await converse(connection, ga=False)
    await azure.close()
    assert "response.text.delta" in types and "hello from upstream" in text
    # the plain client's beta interface always derives wss://: it needs websocket_base_url as well
    v1 = openai.AsyncOpenAI(
        base_url=sidecar.url + "/openai/v1", websocket_base_url=ws_url(sidecar) + "/openai/v1", api_key=CALLER_KEY
    )
    async with v1.beta.realtime.connect(model="gpt-realtime") as connection:
        types, text = await converse(connection, ga=True)
    await v1.close()
    assert "response.output_text.delta" in types and "hello from upstream" in text
    preview, ga = stack.upstream.realtime.sessions
    assert preview.path_qs.startswith("/api/openai/realtime?api-version=")
    assert ga.path_qs.startswith("/api/openai/v1/realtime?model=gpt-realtime")
    for session in (preview, ga):
        await asyncio.wait_for(session.closed.wait(), 10)
        assert_upstream_saw_only_our_token(stack, session)


async def test_sync_sdk_realtime_client(stack: Stack, sidecar: RunningSidecar) -> None:
    def session() -> list[str]:
        client = openai.AzureOpenAI(
            azure_endpoint=sidecar.url,
            api_key=CALLER_KEY,
            api_version=PREVIEW_API_VERSION,
            websocket_base_url=ws_url(sidecar) + "/openai",
        )
        with client.realtime.connect(model="gpt-4o-realtime-preview") as connection:
            connection.response.create()
            types = []
            for event in connection:
                types.append(event.type)
                if event.type == "response.done":
                    break
        client.close()
        return types

    # the sync SDK blocks: run it in a thread so this loop keeps serving the sidecar and the emulators
    types = await asyncio.to_thread(session)
    assert types[0] == "session.created" and types[-1] == "response.done"
    assert_upstream_saw_only_our_token(stack, stack.upstream.realtime.sessions[0])


async def test_upstream_close_code_reaches_the_sdk(stack: Stack, sidecar: RunningSidecar) -> None:
    client = v1_client(sidecar)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        await connection.send({"type": "emulator.close", "code": 4001, "reason": "upstream done"})  # type: ignore[arg-type,misc]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async for _event in connection:
                pass
    await client.close()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "upstream done")


async def test_handshake_refusal_reaches_the_sdk_as_its_status_and_json(stack: Stack, sidecar: RunningSidecar) -> None:
    body = json.dumps({"error": {"code": "PermissionDenied", "message": "no realtime for you"}}).encode()
    stack.upstream.script(
        Scripted(status=403, headers={"Content-Type": "application/json"}, body=body, match="realtime")
    )
    client = v1_client(sidecar)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with client.realtime.connect(model="gpt-realtime"):
            pass
    await client.close()
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "PermissionDenied"
    assert stack.upstream.realtime.sessions == []


# ---- frames, pings, close codes, back-pressure (aiohttp's client) -----------------------------------------------


async def test_text_and_binary_frames_relay_both_ways_and_are_counted(stack: Stack, sidecar: RunningSidecar) -> None:
    every_byte = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(sidecar) + GA) as ws:
        created = json.loads(await ws.receive_str(timeout=10))
        assert created["type"] == "session.created"
        await ws.send_str(json.dumps({"type": "input_audio_buffer.commit", "note": "héllo ✓"}))
        committed = json.loads(await ws.receive_str(timeout=10))
        assert committed["type"] == "input_audio_buffer.committed"
        for payload in (b"", b"\x00\xff", every_byte):
            await ws.send_bytes(payload)
            assert await ws.receive_bytes(timeout=10) == payload
        families = await scrape(http, sidecar.url)
        assert value(families, "sidecar_websocket_sessions_open") == 1
        (session,) = stack.upstream.realtime.sessions
        assert session.received[0] == ("text", json.dumps({"type": "input_audio_buffer.commit", "note": "héllo ✓"}))
        assert [data for kind, data in session.received[1:]] == [b"", b"\x00\xff", every_byte]
    await asyncio.wait_for(session.closed.wait(), 10)
    await until(lambda: sidecar_idle(sidecar), what="the session to end")
    families = await scrape_once(sidecar.url)
    assert value(families, "sidecar_websocket_sessions_open") == 0
    assert value(families, "sidecar_websocket_frames_total", direction="to_upstream", type="text") == 1
    assert value(families, "sidecar_websocket_frames_total", direction="to_upstream", type="binary") == 3
    assert value(families, "sidecar_websocket_frames_total", direction="to_caller", type="text") == 2
    assert value(families, "sidecar_websocket_frames_total", direction="to_caller", type="binary") == 3
    assert value(families, "sidecar_websocket_bytes_total", direction="to_upstream") >= len(every_byte) + 2
    assert value(families, "sidecar_websocket_sessions_total", ended_by="caller") == 1
    assert value(families, "sidecar_requests_total", method="GET", code="101", route="realtime") == 1


async def test_close_codes_and_reasons_propagate_both_ways(stack: Stack, sidecar: RunningSidecar) -> None:
    async with aiohttp.ClientSession() as http:
        # the caller closes: the upstream gets its code and reason, the caller the same code back
        ws = await http.ws_connect(ws_url(sidecar) + GA)
        await ws.receive_str(timeout=10)
        await ws.close(code=4000, message=b"caller done")
        assert ws.close_code == 4000
        (first,) = stack.upstream.realtime.sessions
        await asyncio.wait_for(first.closed.wait(), 10)
        assert (first.close_code, first.close_reason) == (4000, "caller done")

        # the upstream closes: the caller gets its code and reason, the upstream the caller's answer
        ws = await http.ws_connect(ws_url(sidecar) + PREVIEW)
        await ws.receive_str(timeout=10)
        await ws.send_str(json.dumps({"type": "emulator.close", "code": 4002, "reason": "upstream done"}))
        message = await ws.receive(timeout=10)
        assert (message.type, message.data, message.extra) == (aiohttp.WSMsgType.CLOSE, 4002, "upstream done")
        await ws.close()
        second = stack.upstream.realtime.sessions[1]
        await asyncio.wait_for(second.closed.wait(), 10)


async def test_caller_leaving_closes_the_upstream_socket_at_once(stack: Stack, sidecar: RunningSidecar) -> None:
    # no close frame: the caller's TCP connection just goes (a killed process, a lost laptop lid)
    head, reader, writer = await raw_upgrade(sidecar.url, GA.encode())
    assert head.startswith(b"HTTP/1.1 101")
    assert b"session.created" in await asyncio.wait_for(reader.read(4096), 10)
    (session,) = stack.upstream.realtime.sessions
    left = time.monotonic()
    writer.transport.abort()
    await asyncio.wait_for(session.closed.wait(), 10)
    assert session.closed_at is not None
    assert session.closed_at - left < 1.0, session.closed_at - left
    assert session.close_code == 1001  # going away
    print(f"\ncaller left: the upstream socket closed {1000 * (session.closed_at - left):.1f} ms later")


async def test_upstream_leaving_closes_the_caller_with_1014(stack: Stack, sidecar: RunningSidecar) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(sidecar) + GA) as ws:
        await ws.receive_str(timeout=10)
        await ws.send_str(json.dumps({"type": "emulator.drop"}))
        message = await ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 1014  # bad gateway: the upstream's connection broke


async def test_pings_are_answered_on_both_legs(stack: Stack, sidecar: RunningSidecar) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(sidecar) + GA, autoping=False) as ws:
        await ws.receive_str(timeout=10)
        await ws.ping(b"caller-ping")
        pong = await ws.receive(timeout=10)
        assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"caller-ping")
        await ws.send_str(json.dumps({"type": "emulator.ping", "data": "upstream-ping"}))
        (session,) = stack.upstream.realtime.sessions
        await until(lambda: session.pongs, what="the upstream's pong")
        assert session.pongs == [b"upstream-ping"]
        assert session.pings == []  # the caller's ping was answered by the sidecar, not relayed


async def test_a_caller_that_does_not_read_holds_back_the_upstream(stack: Stack, sidecar: RunningSidecar) -> None:
    # 256 MiB: more than the four loopback socket buffers between the upstream and the caller can take in
    # (net.ipv4.tcp_rmem/tcp_wmem allow 32 + 4 MiB per connection here), so only back-pressure stops the upstream
    size, count = 1024 * 1024, 256
    total = size * count
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(sidecar) + GA, max_msg_size=0) as ws:
        await ws.receive_str(timeout=10)
        (session,) = stack.upstream.realtime.sessions
        start = session.sent_bytes
        await ws.send_str(json.dumps({"type": "emulator.flood", "count": count, "size": size}))
        stalled = await stall(lambda: session.sent_bytes)  # the caller reads nothing meanwhile
        held = stalled - start
        assert held < total // 2, f"the upstream could write {held} bytes to a caller that reads nothing"
        received = 0
        while received < total:
            received += len(await ws.receive_bytes(timeout=30))
        assert received == total
        assert session.sent_bytes - start == total
    print(f"\nback-pressure: the upstream wrote {held / 2**20:.1f} MiB of {total / 2**20:.0f} MiB before it stalled")


# ---- handshake refusals and failures ---------------------------------------------------------------------------


async def test_handshake_refusals_keep_their_status(stack: Stack, sidecar: RunningSidecar) -> None:
    # an empty refusal is explained in JSON
    stack.upstream.script(Scripted(status=404, match="realtime"))
    status, body = await refused_with(sidecar.url, GA)
    assert status == 404 and body["error"]["code"] == "UpstreamRefused"
    # an explained one passes as it is: the emulator's own 404 for a path it has no WebSocket on
    status, body = await refused_with(sidecar.url, "/openai/deployments/x/chat/completions")
    assert status == 404 and body["error"]["message"] == "Resource not found"
    # the preview URL without api-version: Azure's answer
    status, body = await refused_with(sidecar.url, "/openai/realtime?deployment=x")
    assert status == 404 and body["error"]["message"] == "Resource not found"
    # an upstream that answers an upgrade like any request (Azure Functions) does not carry WebSockets
    stack.upstream.script(Scripted(status=200, body=b"{}", match="realtime"))
    status, body = await refused_with(sidecar.url, GA)
    assert status == 502 and body["error"]["code"] == "WebSocketsNotSupported"
    assert "Azure Functions" in body["error"]["message"]
    assert stack.upstream.realtime.sessions == []


async def test_upstream_401_on_the_handshake_refreshes_the_token_once(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted.unauthorized())
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(sidecar) + GA) as ws:
        assert json.loads(await ws.receive_str(timeout=10))["type"] == "session.created"
    assert stack.entra.token_requests == 2
    rejected, accepted = stack.upstream.requests
    assert rejected.headers["Authorization"] != accepted.headers["Authorization"]
    assert accepted.claims is not None


async def test_a_token_the_upstream_keeps_refusing_is_explained(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted.unauthorized(), Scripted.unauthorized())  # empty, as App Service answers
    status, body = await refused_with(sidecar.url, GA)
    assert status == 401 and body["error"]["code"] == "UpstreamUnauthorized"
    assert stack.audience in body["error"]["message"] and "auth.scope" in body["error"]["message"]
    assert len(stack.upstream.requests) == 2  # the handshake and one retry with a new token, no more
    assert stack.entra.token_requests == 2


async def test_redirect_on_the_handshake_is_returned_not_followed(stack: Stack, sidecar: RunningSidecar) -> None:
    stack.upstream.script(Scripted(redirect_to=stack.upstream.url + "/openai/v1/realtime?model=elsewhere"))
    head, _, writer = await raw_upgrade(sidecar.url, GA.encode())
    writer.close()
    assert head.startswith(b"HTTP/1.1 307")
    assert b"model=elsewhere" in head
    assert len(stack.upstream.requests) == 1  # the sidecar did not follow it
    assert stack.upstream.realtime.sessions == []


async def test_unreachable_upstream_is_a_502(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack, upstream={"url": "http://127.0.0.1:9"}))
    await wait_ready(running)
    status, body = await refused_with(running.url, GA)
    assert status == 502 and body["error"]["code"] == "UpstreamUnreachable"


# ---- inbound keys ----------------------------------------------------------------------------------------------


async def test_inbound_key_from_header_query_or_subprotocol(stack: Stack, run_sidecar: StartSidecar) -> None:
    running = await run_sidecar(config_for(stack, inbound={"api_keys": ["key-one"]}))
    await wait_ready(running)
    url = ws_url(running)

    client = azure_client(running, api_key="key-one")  # the SDK's api-key header
    async with client.realtime.connect(model="gpt-4o-realtime-preview") as connection:
        assert (await connection.recv()).type == "session.created"
    await client.close()

    wrong = azure_client(running, api_key="key-two")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with wrong.realtime.connect(model="gpt-4o-realtime-preview"):
            pass
    await wrong.close()
    assert refused.value.response.status_code == 401

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url + GA + "&api-key=key-one") as ws:  # the query, as browsers may
            assert json.loads(await ws.receive_str(timeout=10))["type"] == "session.created"
        protocols = ("openai-insecure-api-key.key-one", "realtime")  # the subprotocol, as browsers do
        async with http.ws_connect(url + GA, protocols=protocols) as ws:
            assert ws.protocol == "realtime"
            assert json.loads(await ws.receive_str(timeout=10))["type"] == "session.created"
    status, body = await refused_with(running.url, GA + "&api-key=key-two")
    assert status == 401 and body["error"]["code"] == "Unauthorized"
    protocols = b"Sec-WebSocket-Protocol: openai-insecure-api-key.nope, realtime\r\n"
    status, _ = await refused_with(running.url, GA, protocols)
    assert status == 401
    sessions = stack.upstream.realtime.sessions
    assert len(sessions) == 3
    for session in sessions:
        await asyncio.wait_for(session.closed.wait(), 10)
        assert "key-one" not in session.path_qs and "key-one" not in json.dumps(list(session.headers.items()))
        assert session.offered_protocols in ([], ["realtime"])


async def test_on_behalf_of_each_caller_reaches_the_upstream_as_themselves(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    obo = {"flow": "on_behalf_of", "client_id": stack.client_id, "client_secret": stack.client_secret}
    running = await run_sidecar(config_for(stack, auth=obo))
    oid = stack.entra.register_user("alice@contoso.example")
    user_token = stack.entra.issue_user_token(
        "alice@contoso.example", client_id="chat-frontend", audience=f"api://{stack.client_id}", lifetime=3600
    )
    client = azure_client(running, api_key=None, azure_ad_token=user_token)  # the user's token as Authorization
    async with client.realtime.connect(model="gpt-4o-realtime-preview") as connection:
        _, text = await converse(connection, ga=False)
    await client.close()
    assert f"aud={stack.audience} oid={oid} appid={stack.client_id}" in text
    (session,) = stack.upstream.realtime.sessions
    assert session.headers.getall("Authorization") != [f"Bearer {user_token}"]  # exchanged, not passed on
    assert_upstream_saw_only_our_token(stack, session)

    expired = stack.entra.issue_user_token(
        "alice@contoso.example", client_id="chat-frontend", audience=f"api://{stack.client_id}", expired=True
    )
    status, body = await refused_with(running.url, GA, f"Authorization: Bearer {expired}\r\n".encode())
    assert status == 401 and body["error"]["code"] == "InvalidUserToken"
    assert len(stack.upstream.realtime.sessions) == 1


# ---- shutdown --------------------------------------------------------------------------------------------------


async def test_sigterm_gives_sessions_the_grace_then_closes_them_with_1001(stack: Stack, tmp_path: Path) -> None:
    grace = 2.0
    process, url = await start_serve(tmp_path, config_for(stack, shutdown_grace=grace))
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws", 1) + GA) as ws:
            await ws.receive_str(timeout=10)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await ws.send_bytes(b"still relayed while draining")
            assert await ws.receive_bytes(timeout=10) == b"still relayed while draining"
            message = await ws.receive(timeout=grace + 20)
            closed = time.monotonic() - signalled
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001)
            assert message.extra == "the sidecar is shutting down"
        assert closed >= grace * 0.9, closed  # not before the grace was over
        (session,) = stack.upstream.realtime.sessions
        await asyncio.wait_for(session.closed.wait(), 10)
        assert session.close_code == 1001
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        err = await stop_serve(process)
    assert "Traceback" not in err
    print(f"\nshutdown: SIGTERM -> 1001 at the caller after {closed:.2f} s (grace {grace} s)")


# ---- what an attacker would send -------------------------------------------------------------------------------


async def test_upgrade_with_an_absolute_or_escaping_target_is_refused(stack: Stack, sidecar: RunningSidecar) -> None:
    for target in (
        b"http://evil.example/openai/v1/realtime?model=x",
        b"ws://evil.example/openai/v1/realtime?model=x",
        b"//evil.example/openai/v1/realtime?model=x",
        b"/openai/../v1/realtime?model=x",
        b"/openai/%2e%2e/admin",
    ):
        head, _, writer = await raw_upgrade(sidecar.url, target)
        writer.close()
        assert head.startswith(b"HTTP/1.1 400"), (target, head)
    assert stack.upstream.requests == []


async def test_upgrade_outside_openai_is_never_forwarded(stack: Stack, sidecar: RunningSidecar) -> None:
    for target in (b"/realtime?model=x", b"/v1/realtime?model=x", b"/%6Fpenai/v1/realtime?model=x", b"/metrics"):
        head, _, writer = await raw_upgrade(sidecar.url, target)
        writer.close()
        assert not head.startswith(b"HTTP/1.1 101"), (target, head)
        assert not JWT.search(head.decode("latin-1"))
    assert stack.upstream.requests == []


async def test_malformed_upgrades_are_refused_before_any_token_is_used(stack: Stack, sidecar: RunningSidecar) -> None:
    no_key = b"GET " + GA.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    post = (
        b"POST " + GA.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 2\r\n\r\n{}"
    )
    with_body = (
        b"GET " + GA.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 6\r\n\r\n"
        b"\x81\x04ping"  # a frame smuggled in as the body
    )
    for raw in (no_key, post, with_body):
        head = await send_raw(sidecar.url, raw)
        assert head.startswith(b"HTTP/1.1 400"), head
        assert b"InvalidWebSocketHandshake" in head
    assert stack.upstream.requests == []


async def test_smuggled_keys_and_authorization_never_reach_the_upstream(stack: Stack, sidecar: RunningSidecar) -> None:
    target = GA + "&api-key=a&API-KEY=b&api%2Dkey=c&api-key&x=%2F1&&y"
    extra = (
        b"Authorization: Bearer attacker-token\r\n"
        b"api-key: caller-header-key\r\n"
        b"Sec-WebSocket-Protocol: openai-insecure-api-key.one, chat.v2\r\n"
        b"Sec-WebSocket-Protocol: OPENAI-INSECURE-API-KEY.two,realtime,openai-insecure-api-key\r\n"
    )
    head, reader, writer = await raw_upgrade(sidecar.url, target.encode(), extra)
    try:
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"sec-websocket-protocol: realtime" in head.lower()
        first = await asyncio.wait_for(reader.read(65536), 10)
        for seen in (head, first):
            assert not JWT.search(seen.decode("latin-1"))  # the token never goes back to the caller
    finally:
        writer.transport.abort()
    (session,) = stack.upstream.realtime.sessions
    # the rest of the query passes byte-for-byte, in order
    assert session.path_qs == "/api/openai/v1/realtime?model=gpt-realtime&x=%2F1&&y"
    assert session.offered_protocols == ["chat.v2", "realtime"]
    assert session.headers.getall("Authorization") != ["Bearer attacker-token"]
    assert_upstream_saw_only_our_token(stack, session)
    assert "caller-header-key" not in json.dumps(list(session.headers.items()))


async def test_an_upgrade_target_cannot_leave_the_upstream_base_path(stack: Stack, sidecar: RunningSidecar) -> None:
    # the emulator serves under /api; what the gate lets through is appended to it, never resolved against it
    head, _, writer = await raw_upgrade(sidecar.url, b"/openai/v1/realtime/..%2f..%2f?model=x")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert stack.upstream.requests == []


# ---- helpers ---------------------------------------------------------------------------------------------------


async def raw_upgrade(
    url: str, target: bytes, extra: bytes = b""
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake written by hand: the answer's head, and the connection (the caller closes it)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET " + target + b" HTTP/1.1\r\nHost: sidecar\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n"
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except asyncio.IncompleteReadError as exc:
        head = exc.partial
    return head, reader, writer


async def send_raw(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def refused_with(url: str, target: str, extra: bytes = b"") -> tuple[int, dict]:
    """The HTTP status and JSON body of a WebSocket handshake the sidecar refused (one request)."""
    head, reader, writer = await raw_upgrade(url, target.encode(), extra)
    try:
        assert not head.startswith(b"HTTP/1.1 101"), head
        length = next(
            int(line.partition(b":")[2]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    assert not JWT.search((head + body).decode("latin-1"))  # the token never goes back to the caller
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def stall(progress: Callable[[], int], quiet: float = 1.0, timeout: float = 30.0) -> int:
    """The value of `progress` once it has not moved for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = progress(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError("the upstream never stopped writing")


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, list]:
    async with http.get(url + "/metrics") as response:
        return {family.name: family.samples for family in text_string_to_metric_families(await response.text())}


async def scrape_once(url: str) -> dict[str, list]:
    async with aiohttp.ClientSession() as http:
        return await scrape(http, url)


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    for samples in families.values():
        for found in samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


def sidecar_idle(sidecar: RunningSidecar) -> bool:
    from sidecar.app import WEBSOCKETS

    return all(relay.open_sessions == 0 for relay in sidecar.app[WEBSOCKETS])
