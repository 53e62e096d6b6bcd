"""The secured upstream: an Azure-Function-style proxy in front of Azure OpenAI (plain HTTP).

Authentication runs before routing, like App Service authentication: a missing, malformed,
expired or wrongly addressed bearer token gets 401 with an empty body on any path.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDict

from sidecar_emulators import openai_payloads as payloads
from sidecar_emulators._server import AppServer, Emulator, drop_connection
from sidecar_emulators.keys import JwksSource
from sidecar_emulators.upstream_auth import BearerValidator
from sidecar_emulators.upstream_realtime import RealtimeEndpoint, RealtimeSession
from sidecar_emulators.upstream_script import RecordedRequest, Scripted

__all__ = ["RealtimeSession", "RecordedRequest", "Scripted", "UpstreamEmulator"]

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("gpt-4o-mini", "text-embedding-3-small", "whisper")
REGION = "Sweden Central"


async def _azure_response_ids(request: web.Request, response: web.StreamResponse) -> None:
    """The ids Azure OpenAI puts on every answer (what Microsoft support asks for), unless a script set them."""
    response.headers.setdefault("apim-request-id", str(uuid.uuid4()))
    response.headers.setdefault("x-request-id", str(uuid.uuid4()))
    response.headers.setdefault("x-ms-region", REGION)


class UpstreamEmulator(Emulator):
    def __init__(
        self,
        *,
        jwks: JwksSource,
        issuer: str | Sequence[str],
        audience: str | Sequence[str],
        base_path: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        public_host: str | None = None,
        stream_delay: float = 0.0,
        stream_chunks: int = 5,
        models: Sequence[str] = DEFAULT_MODELS,
        clock_skew: float = 0,
    ) -> None:
        """``jwks`` is ``entra.jwks`` (or a callable returning it, to follow rotation);
        ``issuer``/``audience`` accept one value or several; ``public_host`` is advertised in ``url``
        instead of the bind address."""
        self._public_host = public_host
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.stream_delay = stream_delay
        self.stream_chunks = stream_chunks
        self.models = tuple(models)
        self._validator = BearerValidator(
            jwks=jwks,
            issuers=[issuer] if isinstance(issuer, str) else list(issuer),
            audiences=[audience] if isinstance(audience, str) else list(audience),
            clock_skew=clock_skew,
        )

        self.requests: list[RecordedRequest] = []
        self.stream_events: list[float] = []  # time.monotonic() of every SSE event written
        self.streams_closed_early = 0
        self.stream_closed_early_at: float | None = None  # time.monotonic() when noticed
        self.stream_closed_early_event = asyncio.Event()
        self._script: deque[Scripted] = deque()
        self.realtime = RealtimeEndpoint()  # the Realtime API's WebSockets and what each saw
        self._active: set[asyncio.Transport] = set()  # connections with a request in flight
        self._stopping = asyncio.Event()
        # auto_decompress=False: a gzip request body is recorded (and hashed) as sent.
        self._server = AppServer(self._build_app(), host=host, port=port, auto_decompress=False)

    # ---- lifecycle ----

    async def start(self) -> None:
        self._stopping.clear()
        await self._server.start()

    async def stop(self) -> None:
        """Fast even with hanging or streaming requests: their connections are aborted first."""
        self._stopping.set()
        for transport in list(self._active):
            transport.abort()
        await self._server.stop()

    @property
    def url(self) -> str:
        """Base URL including ``base_path`` (what goes before ``/openai/...``)."""
        return self._server.base_url(self._public_host) + self.base_path

    # ---- test controls ----

    def script(self, *responses: Scripted) -> None:
        """Queue one-shot behaviours, applied in order to the next matching requests."""
        self._script.extend(responses)

    @property
    def pending_script(self) -> list[Scripted]:
        return list(self._script)

    def reset(self) -> None:
        self.requests.clear()
        self.stream_events.clear()
        self._script.clear()
        self.streams_closed_early = 0
        self.stream_closed_early_at = None
        self.stream_closed_early_event.clear()
        self.realtime.reset()

    # ---- HTTP ----

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_azure_response_ids)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            self._active.add(transport)
        try:
            return await self._dispatch(request)
        finally:
            if transport is not None:
                self._active.discard(transport)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        outcome = self._validator.check(request.headers)
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path_qs=request.raw_path,
                headers=CIMultiDict(request.headers),
                body=body,
                body_sha256=hashlib.sha256(body).hexdigest(),
                body_size=len(body),
                claims=outcome.claims,
                received_at=time.monotonic(),
            )
        )
        scripted = self._take_script(request.method, request.path)
        if scripted is not None:
            return await self._scripted(request, scripted, outcome.claims)
        if outcome.status != 200:
            log.debug("upstream rejected %s %s: %s", request.method, request.raw_path, outcome.reason)
            return _empty(outcome.status)
        try:
            decoded = _decoded(body, request.headers.get("Content-Encoding"))
        except (OSError, EOFError, zlib.error):
            return web.json_response({"error": {"code": "BadRequest", "message": "Undecodable body"}}, status=400)
        return await self._route(request, decoded, outcome.claims)

    def _take_script(self, method: str, path: str) -> Scripted | None:
        for entry in self._script:
            if entry.matches(method, path):
                self._script.remove(entry)
                return entry
        return None

    async def _route(self, request: web.Request, body: bytes, claims: dict[str, Any] | None) -> web.StreamResponse:
        prefix = f"{self.base_path}/openai/"
        if not request.path.startswith(prefix):
            return web.json_response(payloads.not_found(), status=404)
        parts = request.path[len(prefix) :].strip("/").split("/")
        method = request.method
        # deployments/{name}/<operation...>  or  v1/<operation...>  or  models
        if parts[0] == "deployments" and len(parts) >= 3:
            model: str | None = parts[1]
            operation = "/".join(parts[2:])
        elif parts[0] == "v1" and len(parts) >= 2:
            model, operation = None, "/".join(parts[1:])
        else:
            model, operation = None, "/".join(parts)
        if operation == "realtime" and model is None:
            return await self.realtime.handle(request, ga=parts[0] == "v1", greeting=_echo(claims or {}))
        if operation == "models" and method == "GET" and (model is None):
            return web.json_response(payloads.models(self.models))
        if method != "POST":
            return web.json_response(payloads.not_found(), status=404)
        if operation == "chat/completions":
            return await self._chat(request, _json(body), model, claims or {})
        if operation == "embeddings":
            request_body = _json(body)
            return web.json_response(payloads.embeddings(model or str(request_body.get("model", "")), request_body))
        if operation == "audio/transcriptions":
            return _transcription(request, body)
        return web.json_response(payloads.not_found(), status=404)

    async def _chat(
        self, request: web.Request, request_body: dict[str, Any], model: str | None, claims: dict[str, Any]
    ) -> web.StreamResponse:
        model = model or str(request_body.get("model", ""))
        content = _echo(claims)
        if request_body.get("stream"):
            chunks = payloads.chat_completion_chunks(model, content, self.stream_chunks, request_body)
            events = [payloads.sse_event(c) for c in chunks] + [payloads.SSE_DONE]
            return await self._stream(request, events)
        return web.json_response(payloads.chat_completion(model, content, request_body))

    async def _stream(
        self, request: web.Request, events: Iterable[bytes], reset_after_bytes: int | None = None
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        sent = 0
        try:
            await response.prepare(request)
            for index, event in enumerate(events):
                if index and self.stream_delay:
                    await asyncio.sleep(self.stream_delay)
                if reset_after_bytes is not None and sent + len(event) >= reset_after_bytes:
                    await response.write(event[: reset_after_bytes - sent])
                    drop_connection(request)
                await response.write(event)  # one write per event: each reaches the socket on its own
                sent += len(event)
                self.stream_events.append(time.monotonic())
            if reset_after_bytes is not None:
                drop_connection(request)  # fewer bytes than asked: reset at the end instead
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            if reset_after_bytes is None and not self._stopping.is_set():
                self._note_closed_early()
            raise
        return response

    def _note_closed_early(self) -> None:
        self.streams_closed_early += 1
        self.stream_closed_early_at = time.monotonic()
        self.stream_closed_early_event.set()

    async def _scripted(
        self, request: web.Request, scripted: Scripted, claims: dict[str, Any] | None
    ) -> web.StreamResponse:
        if scripted.hang:
            await self._stopping.wait()
            drop_connection(request)
        headers = CIMultiDict(scripted.headers)
        if scripted.redirect_to is not None:
            headers["Location"] = scripted.redirect_to
            status = scripted.status if 300 <= scripted.status < 400 else 307
            return web.Response(status=status, headers=headers)
        if scripted.sse_events is not None or scripted.reset_after_bytes is not None:
            if scripted.sse_events is not None:
                events = [payloads.sse_event(e) for e in scripted.sse_events]
            else:
                chunks = payloads.chat_completion_chunks("scripted", _echo(claims or {}), self.stream_chunks, {})
                events = [payloads.sse_event(c) for c in chunks] + [payloads.SSE_DONE]
            return await self._stream(request, events, scripted.reset_after_bytes)
        if scripted.gzip:
            headers.setdefault("Content-Encoding", "gzip")
        body = scripted.wire_body
        return web.Response(status=scripted.status, headers=headers, body=body or None)


def _empty(status: int) -> web.Response:
    return web.Response(status=status)


def _echo(claims: dict[str, Any]) -> str:
    return (
        f"hello from upstream; aud={claims.get('aud')} oid={claims.get('oid')} "
        f"appid={claims.get('appid') or claims.get('azp')}"
    )


def _decoded(body: bytes, content_encoding: str | None) -> bytes:
    """Bodies are stored raw; decode a compressed one only to interpret it."""
    encoding = (content_encoding or "").strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": {"code": "BadRequest", "message": f"Invalid JSON: {exc}"}}),
            content_type="application/json",
        ) from exc
    return value if isinstance(value, dict) else {}


def _transcription(request: web.Request, body: bytes) -> web.Response:
    """Answer with a digest of the uploaded ``file`` part, so tests can check it arrived intact."""
    boundary = parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary")
    if not boundary:
        return web.json_response({"error": {"code": "BadRequest", "message": "multipart expected"}}, status=400)
    fields = _multipart_fields(body, boundary.encode())
    if "file" not in fields:
        return web.json_response({"error": {"code": "BadRequest", "message": "no file part"}}, status=400)
    data = fields["file"]
    text = f"sha256={hashlib.sha256(data).hexdigest()} size={len(data)}"
    if fields.get("response_format", b"json") == b"text":
        return web.Response(text=text, content_type="text/plain")
    return web.json_response({"text": text})


_PART_NAME = re.compile(rb'content-disposition:[^\r\n]*?\bname="([^"]*)"', re.IGNORECASE)


def _multipart_fields(body: bytes, boundary: bytes) -> dict[str, bytes]:
    """Split a multipart/form-data body into name -> bytes, byte-exact.

    The body was already read raw (to hash it), so aiohttp's streaming reader is not available;
    generic MIME parsers may normalise line endings inside binary parts, this does not.
    """
    fields: dict[str, bytes] = {}
    for section in body.split(b"--" + boundary)[1:]:
        if section.startswith(b"--"):  # closing delimiter
            break
        head, separator, content = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        match = _PART_NAME.search(head)
        if separator and match:
            fields[match.group(1).decode()] = content.removesuffix(b"\r\n")
    return fields
