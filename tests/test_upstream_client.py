"""The proxy's own HTTP/1.1 client (sidecar/upstream/): framing, keep-alive, timeouts, on raw sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from sidecar.upstream import ConnectionLost, Origin, Pool, ProtocolError, ReadTimeout
from sidecar.upstream.wire import CHUNKED, LENGTH, NONE, UNTIL_CLOSE, ChunkedDecoder, parse_head

Reply = Callable[[bytes], bytes | None]  # request head -> raw answer (None: stay silent)


def test_chunked_decoder_takes_any_split() -> None:
    parts = [b"data: one\n\n", b"x" * 300, b"data: [DONE]\n\n"]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: t\r\n\r\n"
    for _ in range(200):
        decoder, out, position = ChunkedDecoder(), b"", 0
        while position < len(wire):
            step = random.randint(1, 17)
            out += decoder.feed(wire[position : position + step])
            position += step
        assert out == b"".join(parts) and decoder.done and not decoder.extra
    decoder = ChunkedDecoder()
    decoder.feed(wire + b"HTTP/1.1 200")
    assert decoder.done and decoder.extra
    for bad in (b"zz\r\n", b"3\r\nabcX\r\n"):
        with pytest.raises(ProtocolError):
            ChunkedDecoder().feed(bad)


def test_parse_head_framing() -> None:
    def framing(head: bytes, method: str = "POST") -> tuple[int, int, bool]:
        _, _, _, how, length, keep_alive = parse_head(head, method)
        return how, length, keep_alive

    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (LENGTH, 12, True)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 12", "HEAD") == (NONE, 0, True)
    assert framing(b"HTTP/1.1 204 No Content") == (NONE, 0, True)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked") == (CHUNKED, 0, True)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3")[2] is False
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip") == (UNTIL_CLOSE, 0, False)
    assert framing(b"HTTP/1.1 200 OK") == (UNTIL_CLOSE, 0, False)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close") == (LENGTH, 1, False)
    assert framing(b"HTTP/1.0 200 OK\r\nContent-Length: 1") == (LENGTH, 1, False)
    status, reason, headers, *_ = parse_head(b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nX-A: 1\r\nX-A: 2", "GET")
    assert (status, reason, headers) == (429, "Too Many", [("Retry-After", "7"), ("X-A", "1"), ("X-A", "2")])
    malformed = (b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 OK\r\nBad Header: x", b"HTTP/1.1 200 OK\r\nX")
    for bad in malformed:
        with pytest.raises(ProtocolError):
            parse_head(bad, "GET")
    with pytest.raises(ProtocolError):
        parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2", "GET")


@asynccontextmanager
async def upstream(reply: Reply) -> AsyncIterator[tuple[int, list[bytes], list[int]]]:
    """A raw server: answers each request head with `reply(head)`; yields (port, heads seen, connection ids)."""
    heads: list[bytes] = []
    connections: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        ident = len(writers)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                heads.append(head + body)
                connections.append(ident)
                answer = reply(head)
                if answer is None:
                    await reader.read()  # silent until the client gives up and closes
                    return
                writer.write(answer)
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads, connections
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the handlers see their connections close and end


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_requests_reuse_one_connection_with_host_base_path_and_framing() -> None:
    async with upstream(lambda head: OK) as (port, heads, connections):
        pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}/api", None), connect_timeout=2, read_timeout=2)
        try:
            for method, body in (("POST", b'{"a":1}'), ("GET", b""), ("POST", b"")):
                response = await pool.request(method, "/openai/x?q=%20", [("X-Custom", "v")], body=body)
                assert (response.status, await response.read()) == (200, b"ok")
        finally:
            await pool.close()
    assert connections == [1, 1, 1]
    first, second, third = heads
    assert first.startswith(b"POST /api/openai/x?q=%20 HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\n")
    assert b"X-Custom: v\r\n" in first and first.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')
    assert b"Content-Length" not in second  # a GET without a body announces none
    assert third.endswith(b"Content-Length: 0\r\n\r\n")  # a POST with an empty body says so


async def test_connection_close_and_a_closed_idle_connection_are_not_reused() -> None:
    answers = iter([OK[:-4] + b"Connection: close\r\n\r\nok", OK, OK])
    async with upstream(lambda head: next(answers)) as (port, _, connections):
        pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}", None), connect_timeout=2, read_timeout=2)
        try:
            for _ in range(2):
                response = await pool.request("GET", "/", [], body=b"")
                assert await response.read() == b"ok"
        finally:
            await pool.close()
    assert connections == [1, 2]


async def test_chunked_stream_arrives_in_order_and_a_silent_upstream_times_out() -> None:
    events = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (b"data: 1\n\n", b"data: [DONE]\n\n")) + b"0\r\n\r\n"
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n" + events
    answers = iter([stream, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", None])
    async with upstream(lambda head: next(answers)) as (port, _, _):
        pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}", None), connect_timeout=2, read_timeout=0.4)
        try:
            response = await pool.request("POST", "/", [], body=b"{}")
            assert [chunk async for chunk in response.chunks()] == [b"data: 1\n\ndata: [DONE]\n\n"]
            response = await pool.request("POST", "/", [], body=b"{}")  # the same connection, kept alive
            assert response.ready() == b"half"
            with pytest.raises(ReadTimeout):  # 6 of 10 bytes never come: idle past read_timeout
                await asyncio.wait_for(response.next(), 3)
            response.close()
            with pytest.raises(ReadTimeout):  # no head at all
                await asyncio.wait_for(pool.request("POST", "/", [], body=b"{}"), 3)
        finally:
            await pool.close()


async def test_streamed_upload_is_chunked_and_a_line_break_in_a_header_is_refused() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cde"):
            yield part

    class Stream:
        def __init__(self) -> None:
            self._parts = chunks()

        async def readany(self) -> bytes:
            return await anext(self._parts, b"")

    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}", None), connect_timeout=2, read_timeout=2)
    try:
        response = await pool.request("POST", "/", [], body=None, stream=Stream())
        assert await response.read() == b"ok"
        assert seen[0].endswith(b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
        with pytest.raises(ProtocolError):
            await pool.request("GET", "/", [("X-Evil", "a\r\nInjected: yes")], body=b"")
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_closes_before_answering_is_connection_lost() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}", None), connect_timeout=2, read_timeout=2)
    try:
        with pytest.raises(ConnectionLost):
            await pool.request("POST", "/", [], body=b"{}")
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
