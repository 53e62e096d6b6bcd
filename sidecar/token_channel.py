"""One token for every worker process: the parent owns the authorizer, the workers ask it over a channel.

Both ends use only declared interfaces (tokens/base.py): a worker's ChannelAuthorizer is an Authorizer like any
other, and the parent's TokenBroker serves the workers from the parent's Authorizer (token_for,
token_after_rejection, current) as its observer, so neither the manager nor the app knows workers exist.

Each worker gets one end of a socketpair made before the fork: nothing on the filesystem, nothing another
process could connect to. Messages are JSON lines.

  parent -> worker  {"token": ..., "expires_on": ..., "refresh_on": ...} for every new token (pushed when the
                    observer hears of a successful call) and as the answer to a request ({"id": n, ...});
                    {"observed": [outcome, seconds]} for every identity-provider call, so that each
                    worker's /metrics counts the parent's calls (the worker's authorizer tells its observer);
                    {"id": n, "error": {...}} when a request could not be served;
                    {"id": n, "no_token": true}: no new token for that rejection now (the manager's rejection
                    pause): the worker answers its caller with the upstream's 401.
  worker -> parent  {"id": n, "op": "get"}: no valid token is cached (a cold start);
                    {"id": n, "op": "refresh", "rejected": <digest>}: the upstream answered 401 to that token.

A worker keeps the last token and serves it with no round trip while it is valid (the manager's
EXPIRY_SKEW); past that it asks and waits, so it never injects an expired token. The parent's manager is
single-flight, so however many workers ask at once, the identity provider sees one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.tokens.base import AccessToken, Authorizer, IdentityError, TokenObserver, mark_retrieved, usable

log = logging.getLogger("sidecar.workers")


def digest(token: str) -> str:
    """How a worker names a rejected token to the parent without sending it back."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _token_message(token: AccessToken, request_id: int | None = None) -> bytes:
    message: dict[str, Any] = {"token": token.token, "expires_on": token.expires_on, "refresh_on": token.refresh_on}
    if request_id is not None:
        message["id"] = request_id
    return json.dumps(message).encode() + b"\n"


def _no_token_message(request_id: int) -> bytes:
    return json.dumps({"id": request_id, "no_token": True}).encode() + b"\n"


def _error_message(error: IdentityError, request_id: int | None) -> bytes:
    fields = {
        "description": error.description,
        "code": error.code,
        "retryable": error.retryable,
        "status": error.status,
        "hint": error.hint,
    }
    return json.dumps({"id": request_id, "error": fields}).encode() + b"\n"


class TokenBroker:
    """The parent's side: answers the workers from the parent's authorizer, and is that authorizer's observer
    (`observe`, given when the authorizer is built): every identity-provider call is told to every worker, and
    after a successful one the new token is pushed to all."""

    def __init__(self, channels: list[socket.socket]) -> None:
        self._channels = channels
        self._authorizer: Authorizer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, authorizer: Authorizer) -> None:
        """Serve the workers from `authorizer`; start it after this, so that no call goes untold."""
        self._authorizer = authorizer
        for channel in self._channels:
            reader, writer = await asyncio.open_unix_connection(sock=channel)
            self._writers.append(writer)
            self._tasks.append(asyncio.create_task(self._serve(reader, writer), name="token-broker"))

    def observe(self, flow: str, outcome: str, seconds: float) -> None:
        self._send_all(json.dumps({"observed": [outcome, seconds]}).encode() + b"\n")
        held = self._authorizer.current if self._authorizer is not None else None
        if outcome == "success" and held is not None:
            self._send_all(_token_message(held))  # the authorizer holds the new token when it tells its observer

    def _send_all(self, message: bytes) -> None:
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(message)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            try:
                request = json.loads(line)
                request_id = int(request["id"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed message from a worker")
                continue
            try:
                token = await self._answer(request)
            except IdentityError as exc:
                reply = _error_message(exc, request_id)
            else:
                reply = _no_token_message(request_id) if token is None else _token_message(token, request_id)
            if not writer.is_closing():
                writer.write(reply)

    async def _answer(self, request: Mapping[str, Any]) -> AccessToken | None:
        authorizer = self._authorizer
        assert authorizer is not None
        if request.get("op") == "refresh":
            held = authorizer.current
            # an unknown digest ("") names a token already replaced: the authorizer answers with the held one
            rejected = held.token if held is not None and digest(held.token) == request.get("rejected") else ""
            token = await authorizer.token_after_rejection({}, rejected)  # its policy: one call however many ask
            if token is None:
                return None
        else:
            token = await authorizer.token_for({})
        # The answer is the token the authorizer holds (nothing ran in between); its expiry goes with it.
        held = authorizer.current
        if held is None or not held.usable():  # pragma: no cover - an authorizer whose tokens are per caller
            raise IdentityError("the sidecar's token process holds no token", retryable=True)
        return held

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class ChannelAuthorizer(Authorizer):
    """A worker's Authorizer: the parent's token, cached here until it is no longer valid. `observer` is told of
    the parent's identity-provider calls."""

    def __init__(
        self,
        channel: socket.socket,
        flow: str,
        *,
        observer: TokenObserver | None = None,
        on_lost: Callable[[], None] | None = None,
        max_wait: float = 30.0,
    ) -> None:
        self.flow = flow
        self._channel = channel
        self._observer = observer
        self._on_lost = on_lost
        self._max_wait = max_wait
        self._current: AccessToken | None = None
        self._last_error: IdentityError | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._next_id = 0
        self._asking: dict[str, tuple[int, asyncio.Future[AccessToken | None]]] = {}  # op key -> (id, answer)
        self._lost = False

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._channel)
        self._reader_task = asyncio.create_task(self._read(reader), name="token-channel")
        if self._current is None:
            self._request("get", {"op": "get"})  # ask at once: the parent pushes only new tokens

    async def aclose(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        for _, future in self._asking.values():
            future.cancel()

    async def token_for(self, headers: Mapping[str, str] | None = None) -> str:
        current = self._current
        if current is not None and current.usable():
            return current.token  # the hot path: no round trip to the parent
        token = await self._wait("get", {"op": "get"})
        if token is None:  # pragma: no cover - the parent answers a "get" with a token or an error
            raise IdentityError("no token from the sidecar's token process", retryable=True)
        return token.token

    async def token_after_rejection(self, headers: Mapping[str, str] | None, rejected: str) -> str | None:
        current = self._current
        if current is not None and current.token != rejected and current.usable():
            return current.token  # a newer token arrived meanwhile
        named = digest(rejected)
        token = await self._wait(f"refresh:{named}", {"op": "refresh", "rejected": named})
        return None if token is None else token.token  # None: the parent's manager has no new token now

    # -- the channel --------------------------------------------------------------------------------

    def _request(self, key: str, message: dict[str, Any]) -> asyncio.Future[AccessToken | None]:
        """One request per key in flight (single-flight here too); everyone waiting shares its answer."""
        asking = self._asking.get(key)
        if asking is not None:
            return asking[1]
        future: asyncio.Future[AccessToken | None] = asyncio.get_running_loop().create_future()
        if self._lost or self._writer is None or self._writer.is_closing():
            future.set_exception(IdentityError("the sidecar's token process has stopped", retryable=True))
            return future
        future.add_done_callback(mark_retrieved)  # an answer nobody awaits (the first "get") must not warn
        self._next_id += 1
        self._asking[key] = (self._next_id, future)
        self._writer.write(json.dumps({**message, "id": self._next_id}).encode() + b"\n")
        return future

    async def _wait(self, key: str, message: dict[str, Any]) -> AccessToken | None:
        future = self._request(key, message)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self._max_wait)
        except TimeoutError:
            raise IdentityError("still waiting for the identity provider", retryable=True) from None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._handle(json.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.warning("token channel failed: %s", type(exc).__name__)
        self._lost = True
        error = IdentityError("the sidecar's token process has stopped", retryable=True)
        for _, future in self._asking.values():
            if not future.done():
                future.set_exception(error)
        self._asking.clear()
        if self._on_lost is not None:
            self._on_lost()

    def _handle(self, message: dict[str, Any]) -> None:
        if "observed" in message:
            outcome, seconds = message["observed"]
            self._observe(str(outcome), float(seconds))
            return
        request_id = message.get("id")
        if "error" in message:
            fields = message["error"]
            error = IdentityError(
                str(fields.get("description") or "unknown error"),
                code=fields.get("code"),
                retryable=bool(fields.get("retryable", True)),
                status=int(fields.get("status") or 503),
                hint=fields.get("hint"),
            )
            self._last_error = error
            self._settle(lambda key, asked_id: asked_id == request_id, error=error)
            return
        if message.get("no_token"):
            self._settle(lambda key, asked_id: asked_id == request_id)
            return
        token = AccessToken(
            token=str(message["token"]),
            expires_on=float(message["expires_on"]),
            refresh_on=float(message["refresh_on"]) if message.get("refresh_on") else None,
        )
        if self._current is None or token.expires_on >= self._current.expires_on or not usable(self._current):
            self._current = token
        self._last_error = None
        if not token.usable():
            return
        named = digest(token.token)
        # any valid token answers a "get"; a "refresh" only with a token other than the rejected one
        self._settle(
            lambda key, asked_id: (
                asked_id == request_id or key == "get" or (key.startswith("refresh:") and key != f"refresh:{named}")
            ),
            token=token,
        )

    def _settle(
        self,
        matches: Callable[[str, int], bool],
        *,
        token: AccessToken | None = None,
        error: IdentityError | None = None,
    ) -> None:
        for key, (asked_id, future) in list(self._asking.items()):
            if not matches(key, asked_id):
                continue
            del self._asking[key]
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(token)  # None only for a "no_token" answer
