"""The sidecar as an attacker or an unlucky operator meets it: odd request targets, bad bytes, slow and idle
connections, broken upstreams, and a seeded fuzz — all over raw loopback sockets.

What must hold whatever arrives: the token goes to the upstream's origin and base path and nowhere else, no
answer is a 500, nothing is logged with a traceback, and the identity provider is asked no more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable

import pytest
from harness import BODY, CHAT, JWT, StartSidecar, config_for, wait_ready

from sidecar.server import RunningSidecar
from sidecar.upstream import OffOrigin, Pool
from sidecar_emulators import Scripted, Stack


async def exchange(url: str, raw: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the sidecar and return everything it answers until it closes or goes quiet."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            while data := await asyncio.wait_for(reader.read(65536), timeout):
                chunks.append(data)
                if _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(answer: bytes) -> int | None:
    """The status code of the first response, None if the sidecar closed without answering."""
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def request(target: str | bytes, *, method: bytes = b"GET", headers: bytes = b"", body: bytes = b"") -> bytes:
    target = target.encode() if isinstance(target, str) else target
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: sidecar\r\n"
        + headers
        + length
        + b"Connection: close\r\n\r\n"
        + body
    )


Records = Callable[[], list[logging.LogRecord]]


@pytest.fixture
def tracebacks(caplog: pytest.LogCaptureFixture) -> Records:
    """The log records so far at ERROR or carrying a traceback."""
    caplog.set_level(logging.INFO)
    return lambda: [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# Every form of request target RFC 9112 allows, and the tricks that would move a glued URL off the origin.
REFUSED_TARGETS = [
    "http://evil.example/openai/models",  # absolute form
    "https://127.0.0.1:1/openai/models",
    "work://x/openai/models",  # a scheme that glues onto the upstream host
    "alhost://x/openai/models",
    "//evil.example/openai/models",  # network-path reference
    "/\\evil.example/openai/models",
    "/openai/../admin",
    "/openai/%2e%2e/%2e%2e/admin",
    "/openai/%252e%252e/admin",
]


async def test_every_non_origin_target_is_refused_and_nothing_leaves_the_origin(
    stack: Stack, sidecar: RunningSidecar, tracebacks: Records
) -> None:
    for target in REFUSED_TARGETS:
        answer = await exchange(sidecar.url, request(target))
        assert status_of(answer) == 400, (target, answer[:200])
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] in ("InvalidRequestTarget", "InvalidPath")
    # authority form and asterisk form: aiohttp's own 400 or ours, or a closed connection, never a forward
    for raw in (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert status_of(await exchange(sidecar.url, raw)) in (400, None)
    assert stack.upstream.requests == []
    assert tracebacks() == []


async def test_absolute_target_cannot_escape_the_base_path(
    stack: Stack, sidecar: RunningSidecar, tracebacks: Records
) -> None:
    """With a base path (/api) the host stays, but main forwarded `/apiwork://x/openai/...`."""
    for target in ("work://x/openai/models", "http://127.0.0.1/openai/models?api-version=1"):
        assert status_of(await exchange(sidecar.url, request(target))) == 400
    assert status_of(await exchange(sidecar.url, request("/openai/models?api-version=1"))) == 200
    assert [seen.path_qs for seen in stack.upstream.requests] == ["/api/openai/models?api-version=1"]
    assert tracebacks() == []


async def test_host_extension_with_a_port_less_upstream_url_sends_no_token(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    """upstream.url http://loc + target `alhost://x/...` glued to http://localhost://x/... on main: a listener
    on localhost:80 received the bearer token. Here it must receive nothing at all."""
    received: list[bytes] = []

    async def trap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    traps = []
    for host in ("127.0.0.1", "::1"):
        try:
            traps.append(await asyncio.start_server(trap, host, 80))
        except OSError as exc:  # not root, or port 80 taken: the transport-level test below still runs
            if host == "127.0.0.1":
                pytest.skip(f"cannot listen on {host}:80 ({exc.strerror})")
    try:
        config = config_for(stack, upstream={"url": "http://loc", "allow_insecure": True})
        running = await run_sidecar(config)
        await wait_ready(running)
        for target in ("alhost://x/openai/models", "alhost/openai/models", "http://localhost/openai/models"):
            assert status_of(await exchange(running.url, request(target))) in (400, None), target
        await asyncio.sleep(0.2)
        assert received == []
    finally:
        for server in traps:
            server.close()


async def test_transport_refuses_any_url_off_the_upstream_origin() -> None:
    """The second lock: whatever built the path, the transport sends nothing off scheme, host, port, base path."""
    import ssl

    for base, path in (
        ("http://loc", "alhost://x/openai/models"),
        ("http://127.0.0.1:8", "0/openai/models"),  # the port grows to 80
        ("https://myfunc.azurewebsites.net", "work://x/openai/models"),
        ("http://127.0.0.1:9/api", "work://x/openai/models"),  # same host, out of the base path
    ):
        pool = Pool(base, ssl.create_default_context(), connect_timeout=1, read_timeout=1)
        try:
            with pytest.raises(OffOrigin):
                await pool.request("GET", path, [], body=b"")
        finally:
            await pool.close()


async def test_non_utf8_header_values_get_4xx_never_500(
    stack: Stack, run_sidecar: StartSidecar, tracebacks: Records
) -> None:
    running = await run_sidecar(config_for(stack, inbound={"api_keys": ["right-key"]}))
    await wait_ready(running)
    answer = await exchange(running.url, request(CHAT, method=b"POST", headers=b"api-key: \xff\xfe\x80\r\n", body=BODY))
    assert status_of(answer) == 401  # main: 500 with a traceback, before authentication
    bearer = b"Authorization: Bearer \xc3\x28\r\n"
    assert status_of(await exchange(running.url, request(CHAT, method=b"POST", headers=bearer, body=BODY))) == 401
    # with the right key, a non-UTF-8 value in another header: forwarded as the bytes it was, or refused, never 500
    odd = b"api-key: right-key\r\nX-Odd: caf\xe9\r\n"
    assert status_of(await exchange(running.url, request(CHAT, method=b"POST", headers=odd, body=BODY))) in (200, 400)
    assert tracebacks() == []


MALFORMED = [
    b"GET /openai/models HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
    b"GET /openai/models HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET /openai/mo dels HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    b"GARBAGE\r\n\r\n",
]


async def test_malformed_requests_get_400_and_one_log_line_without_traceback(
    stack: Stack, sidecar: RunningSidecar, caplog: pytest.LogCaptureFixture, tracebacks: Records
) -> None:
    for raw in MALFORMED:
        answer = await exchange(sidecar.url, raw)
        assert status_of(answer) in (400, 413, 431, None), (raw[:60], answer[:100])
    assert tracebacks() == []  # main: an ERROR with a full traceback for each
    quiet = [r for r in caplog.records if r.name == "sidecar.http" and "malformed request from" in r.getMessage()]
    assert quiet and all(r.levelno == logging.INFO for r in quiet)
    assert stack.upstream.requests == []


async def test_a_chunked_upload_whose_framing_breaks_midway_is_not_a_500(
    stack: Stack, sidecar: RunningSidecar, tracebacks: Records
) -> None:
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer = await exchange(sidecar.url, head + b"5\r\nhello\r\nnot-a-size\r\n", timeout=6)
    assert status_of(answer) in (400, 502, None)
    assert tracebacks() == []


async def test_slow_headers_idle_connections_and_the_connection_cap(stack: Stack, run_sidecar: StartSidecar) -> None:
    config = config_for(stack, listen={"header_timeout": 0.5, "keepalive_timeout": 0.5, "max_connections": 4})
    running = await run_sidecar(config)
    await wait_ready(running)
    host, port = running.url.removeprefix("http://").rsplit(":", 1)

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), seconds) is not None
        except TimeoutError:
            return False

    # slowloris: a head that never ends is cut at header_timeout (main: never)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /openai/models HTTP/1.1\r\nHost: x\r\n")
    assert await closed_within(reader, 5)
    writer.close()
    # a kept-alive connection left idle after a response is closed at keepalive_timeout
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await closed_within(reader, 5)
    writer.close()
    # past max_connections a new connection is closed at once, and the ones held keep working
    held = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    extra_reader, extra_writer = await asyncio.open_connection(host, int(port))
    assert await asyncio.wait_for(extra_reader.read(), 5) == b""
    extra_writer.close()
    r0, w0 = held[0]
    w0.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(r0.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    for _, w in held:
        w.close()


async def test_past_the_replay_budget_a_401_reaches_the_caller_without_a_token_request(
    stack: Stack, run_sidecar: StartSidecar
) -> None:
    running = await run_sidecar(config_for(stack, upstream={"replay_buffer": 0}))
    await wait_ready(running)
    stack.upstream.script(Scripted.unauthorized())
    before = stack.entra.token_requests
    answer = await exchange(running.url, request(CHAT, method=b"POST", body=BODY))
    assert status_of(answer) == 401
    assert b"UpstreamUnauthorized" in answer
    assert stack.entra.token_requests == before  # nothing buffered, so nothing replayed and no refresh


async def test_an_upstream_that_breaks_off_with_its_head_gets_502_not_500(
    stack: Stack, run_sidecar: StartSidecar, tracebacks: Records
) -> None:
    connections: list[int] = []

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n")
        writer.close()  # FIN right behind a short body: it arrives with the head

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        running = await run_sidecar(config_for(stack, upstream={"url": f"http://127.0.0.1:{port}"}))
        await wait_ready(running)
        for _ in range(20):
            answer = await exchange(running.url, request("/openai/models"))
            assert status_of(answer) in (200, 502, None)  # a cut body, or 502 if it broke before anything was sent
    finally:
        server.close()
    assert len(connections) == 20
    assert tracebacks() == []


def _fuzz_requests(seed: int, count: int) -> list[bytes]:
    """Request lines, headers and chunked bodies, most nearly right and some wrong in one place."""
    rng = random.Random(seed)
    paths = ["/openai/models", CHAT, "/openai/deployments/x/embeddings?api-version=1", "/healthz", "/readyz", "/"]
    odd_targets = ["*", "http://evil/openai/models", "//evil/openai/", "work://x/openai/", "evil:443", "/openai/..",
                   "/openai/%2e%2e/", "/openai/\\..\\", "/openai/%00", "/openai/%ff%fe", "/%6fpenai/models",
                   "/openai/" + "a" * 9000, "/openai/\x7f", "/openai/?" + "&" * 100]  # fmt: skip
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"BREW", b"G\x00T"]
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 extra", b"", b"http/1.1"]
    header_pool = [b"Accept: */*", b"X-Odd: \xff\xfe", b"api-key: k\x80", b"Authorization: Bearer junk",
                   b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked", b"Content-Length: 3",
                   b"Content-Length: 99999999999999999999", b"Expect: 100-continue", b"Expect: 42-nonsense",
                   b"Connection: keep-alive, X-Hop", b"Upgrade: websocket", b"Host: evil.example",
                   b":empty-name: v", b"X-Long: " + b"b" * 10_000, b"X-Fold: a\r\n folded",
                   b"Content-Encoding: gzip"]  # fmt: skip
    out = []
    for _ in range(count):
        target = (rng.choice(odd_targets) if rng.random() < 0.35 else rng.choice(paths)).encode("utf-8", "replace")
        method = rng.choice(methods) if rng.random() < 0.2 else rng.choice([b"GET", b"POST"])
        version = rng.choice(versions) if rng.random() < 0.15 else b"HTTP/1.1"
        headers = rng.sample(header_pool, rng.randint(0, 4))
        body = b""
        if any(h.startswith(b"Transfer-Encoding: chunked") for h in headers):
            size = rng.randint(0, 40)
            chunk = bytes(rng.randrange(256) for _ in range(size))
            body = b"%x\r\n" % size + chunk + b"\r\n" + rng.choice([b"0\r\n\r\n", b"zz\r\n", b"", b"1\r\n"])
        elif any(h.startswith(b"Content-Length: 3") for h in headers):
            body = rng.choice([b"abc", b"ab", b"abcdef"])
        head = method + b" " + target + (b" " + version if version else b"") + b"\r\nHost: sidecar\r\n"
        out.append(head + b"".join(h + b"\r\n" for h in headers) + b"Connection: close\r\n\r\n" + body)
    return out


async def test_seeded_fuzz_never_500_never_leaves_the_base_path_never_leaks(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture, tracebacks: Records
) -> None:
    running = await run_sidecar(config_for(stack, listen={"header_timeout": 2}, upstream={"read_timeout": 2}))
    await wait_ready(running)
    token_requests = stack.entra.token_requests
    statuses: dict[int | None, int] = {}
    fuzz = _fuzz_requests(seed=20261130, count=300)
    # ten at a time: bounded, and concurrent enough to interleave. A pool rather than batches of ten: the few
    # requests the sidecar waits on (a body that never comes) then overlap instead of each holding a batch
    # for the whole 4 s (32 s of the run before)
    pool = asyncio.Semaphore(10)

    async def send(raw: bytes) -> bytes:
        async with pool:
            return await exchange(running.url, raw, timeout=4)

    answers = await asyncio.gather(*(send(raw) for raw in fuzz))
    for answer in answers:
        statuses[status_of(answer)] = statuses.get(status_of(answer), 0) + 1
    assert 500 not in statuses, statuses
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 20, statuses  # the fuzz reached both sides
    assert all(seen.path_qs.startswith("/api/openai/") for seen in stack.upstream.requests)
    assert stack.entra.token_requests == token_requests  # no request made the sidecar ask for another token
    assert not JWT.findall(b"".join(answers).decode("latin-1"))
    assert not JWT.findall("\n".join(r.getMessage() for r in caplog.records))
    assert tracebacks() == []


async def test_a_small_body_that_trickles_is_cut_off_with_408(
    stack: Stack, sidecar: RunningSidecar, monkeypatch: pytest.MonkeyPatch, tracebacks: Records
) -> None:
    """A body announced small (kept for a 401 replay) but never finished held a handler and its replay bytes
    forever; now it has BODY_READ_TIMEOUT to arrive, and nothing is sent upstream meanwhile."""
    from sidecar import proxy

    monkeypatch.setattr(proxy, "BODY_READ_TIMEOUT", 0.5)
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n"
    answer = await exchange(sidecar.url, head + b'{"messages": ', timeout=5)
    assert status_of(answer) == 408 and b"RequestTimeout" in answer
    assert stack.upstream.requests == []
    assert tracebacks() == []
