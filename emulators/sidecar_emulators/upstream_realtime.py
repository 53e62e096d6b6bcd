"""The upstream's Realtime API: WebSockets at /openai/realtime (preview: `?api-version=...&deployment=...`, the
beta event names) and /openai/v1/realtime (GA: `?model=...`, the GA event names).

The upstream emulator checks the bearer token before routing, so a handshake without a valid one is refused
with 401 before any upgrade, as App Service authentication does. The events are a faithful-enough echo of the
service's shapes for the openai SDK to parse; binary messages come back as they were. Text events of type
`emulator.*` are test controls (close with a code, flood, ping, drop the connection). Every session records
what the endpoint saw: the handshake's headers, path and subprotocols, the messages, and how it was closed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from sidecar_emulators import openai_payloads as payloads

# The subprotocol the endpoint chooses when the client offers it (as the Realtime API does for browsers).
PROTOCOL = "realtime"


@dataclass
class RealtimeSession:
    """What one Realtime WebSocket saw, for tests."""

    path_qs: str  # the handshake's raw path and query
    headers: CIMultiDict[str]  # the handshake's headers (a copy; duplicates kept)
    offered_protocols: list[str]
    protocol: str | None  # the subprotocol the endpoint chose
    model: str
    received: list[tuple[str, Any]] = field(default_factory=list)  # ("text", str) or ("binary", bytes)
    pongs: list[bytes] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)  # pings the client sent (answered)
    sent_bytes: int = 0  # payload bytes written to the client so far
    close_code: int | None = None  # the code of the client's close frame; None: it left without one
    close_reason: str = ""
    closed_at: float | None = None  # time.monotonic() when the connection ended, however it ended
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def event_types(self) -> list[str]:
        return [json.loads(data).get("type", "") for kind, data in self.received if kind == "text"]


class RealtimeEndpoint:
    def __init__(self) -> None:
        self.sessions: list[RealtimeSession] = []

    def reset(self) -> None:
        self.sessions.clear()

    async def handle(self, request: web.Request, *, ga: bool, greeting: str) -> web.StreamResponse:
        if ga:
            model = request.query.get("model", "")
            if not model:
                return _error(400, "BadRequest", "the model query parameter is required")
        else:
            model = request.query.get("deployment", "")
            if not request.query.get("api-version"):
                return _error(404, "404", "Resource not found")  # what Azure says without an api-version
            if not model:
                return _error(400, "BadRequest", "the deployment query parameter is required")
        offered = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",")]
        socket = web.WebSocketResponse(
            protocols=(PROTOCOL,), autoclose=False, autoping=False, max_msg_size=0, compress=False
        )
        if not socket.can_prepare(request).ok:
            return _error(400, "BadRequest", "expected a WebSocket upgrade")
        await socket.prepare(request)
        session = RealtimeSession(
            path_qs=request.raw_path,
            headers=CIMultiDict(request.headers),
            offered_protocols=[p for p in offered if p],
            protocol=socket.ws_protocol,
            model=model,
        )
        self.sessions.append(session)
        try:
            await _Conversation(request, socket, session, ga=ga, greeting=greeting).run()
        except ConnectionResetError:
            pass  # the client left while the endpoint was writing: recorded as closed without a close frame
        finally:
            session.closed_at = time.monotonic()
            session.closed.set()
        return socket


class _Conversation:
    def __init__(
        self, request: web.Request, socket: web.WebSocketResponse, session: RealtimeSession, *, ga: bool, greeting: str
    ) -> None:
        self._request = request
        self._socket = socket
        self._session = session
        self._ga = ga
        self._greeting = greeting
        self._config: dict[str, Any] = {
            "id": "sess_" + uuid.uuid4().hex[:20],
            "object": "realtime.session",
            "model": session.model,
            **({"type": "realtime", "output_modalities": ["audio"]} if ga else {"modalities": ["text", "audio"]}),
        }

    async def run(self) -> None:
        socket, session = self._socket, self._session
        await self._send({"type": "session.created", "session": self._config})
        while True:
            message = await socket.receive()
            if message.type is WSMsgType.TEXT:
                session.received.append(("text", message.data))
                await self._answer(message.data)
            elif message.type is WSMsgType.BINARY:
                session.received.append(("binary", message.data))
                await self._send_bytes(message.data)
            elif message.type is WSMsgType.PING:
                session.pings.append(message.data)
                await socket.pong(message.data)
            elif message.type is WSMsgType.PONG:
                session.pongs.append(message.data)
            elif message.type is WSMsgType.CLOSE:
                session.close_code, session.close_reason = message.data, message.extra or ""
                await socket.close(code=message.data or WSCloseCode.OK, message=(message.extra or "").encode())
                return
            else:  # CLOSING, CLOSED, ERROR: the client left without a close frame
                return

    async def _answer(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = {}
        kind = event.get("type", "") if isinstance(event, dict) else ""
        if kind.startswith("emulator."):
            await self._control(kind, event)
        elif kind == "session.update":
            self._config.update(event.get("session") or {})
            await self._send({"type": "session.updated", "session": self._config})
        elif kind == "conversation.item.create":
            item = {"id": "item_" + uuid.uuid4().hex[:20], "status": "completed", **(event.get("item") or {})}
            if self._ga:
                await self._send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
                await self._send({"type": "conversation.item.done", "previous_item_id": None, "item": item})
            else:
                await self._send({"type": "conversation.item.created", "previous_item_id": None, "item": item})
        elif kind == "input_audio_buffer.append":
            pass  # audio is taken in silently, as the service does
        elif kind == "input_audio_buffer.commit":
            item_id = "item_" + uuid.uuid4().hex[:20]
            await self._send({"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": item_id})
        elif kind == "response.create":
            await self._respond()
        else:
            await self._send(
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "unknown_event",
                        "message": f"unknown event type {kind!r}",
                        "event_id": event.get("event_id") if isinstance(event, dict) else None,
                    },
                }
            )

    async def _respond(self) -> None:
        response_id = "resp_" + uuid.uuid4().hex[:20]
        item_id = "item_" + uuid.uuid4().hex[:20]
        response = {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}
        await self._send({"type": "response.created", "response": response})
        prefix = "response.output_text" if self._ga else "response.text"
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        for piece in payloads.split_content(self._greeting, 3):
            await self._send({"type": prefix + ".delta", **where, "delta": piece})
        await self._send({"type": prefix + ".done", **where, "text": self._greeting})
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text" if self._ga else "text", "text": self._greeting}],
        }
        done = {**response, "status": "completed", "output": [item]}
        await self._send({"type": "response.done", "response": done})

    async def _control(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "emulator.close":
            await self._socket.close(code=int(event.get("code", 1000)), message=str(event.get("reason", "")).encode())
        elif kind == "emulator.flood":
            chunk = b"\x00" * int(event.get("size", 65536))
            for _ in range(int(event.get("count", 1))):
                await self._send_bytes(chunk)
        elif kind == "emulator.ping":
            await self._socket.ping(str(event.get("data", "")).encode())
        elif kind == "emulator.drop":
            transport = self._request.transport
            if transport is not None:
                transport.abort()

    async def _send(self, event: dict[str, Any]) -> None:
        data = json.dumps({"event_id": "event_" + uuid.uuid4().hex[:20], **event})
        await self._socket.send_str(data)
        self._session.sent_bytes += len(data)

    async def _send_bytes(self, data: bytes) -> None:
        await self._socket.send_bytes(data)
        self._session.sent_bytes += len(data)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
