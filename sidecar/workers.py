"""`workers: N`: several serving processes on one port, and still one identity-provider call per token.

Why: one Python process uses one core, and the proxy's per-request cost is CPU in Python (see bench/README.md
for the profile); more processes are the way to use the other cores.

How:
- the parent reserves the port with a bound but not listening SO_REUSEPORT socket (so port 0 becomes a real
  port and nobody else takes it), makes one socketpair per worker, and forks the workers before it starts an
  event loop or a thread, and before a flow's heavy libraries (azure-identity, cryptography) are imported (msal
  comes with the flow registry, ~1 MB that every flow needs);
- each worker listens on that port with a SO_REUSEPORT socket of its own, so the kernel spreads new connections
  across them, and serves the app with a ChannelAuthorizer: the token comes from the parent
  (sidecar.token_channel), and the core modules see only an Authorizer and a socket;
- the parent runs the only authorizer (the flow's TokenManager) and answers the workers through the
  Authorizer interface, as its observer; it forwards SIGTERM/SIGINT to them and
  waits while they drain; if a worker dies unexpectedly it stops the others and exits 1, so that the
  orchestrator restarts the sidecar as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from sidecar.config import Settings
from sidecar.server import serve, warn_if_exposed
from sidecar.token_channel import ChannelAuthorizer, TokenBroker
from sidecar.tokens import build_authorizer
from sidecar.tokens.base import TokenObserver

log = logging.getLogger("sidecar.workers")

Runner = Callable[[Coroutine[Any, Any, int]], int]


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT, not listening yet. The parent's never listens: it holds the port (port 0
    becomes a real one, and nobody else takes it); each worker listens on one of its own beside it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def run_workers(settings: Settings, count: int, run: Runner) -> int:
    """Fork `count` workers, then supervise them; returns the exit code (0 after a clean drain)."""
    reserved = reuse_port_socket(settings.listen.host, settings.listen.port)
    port = reserved.getsockname()[1]
    worker_settings = settings.model_copy(update={"listen": settings.listen.model_copy(update={"port": port})})
    pids: list[int] = []
    channels: list[socket.socket] = []
    for index in range(count):
        parent_end, worker_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker: it never returns from here
            for sock in (reserved, parent_end, *channels):
                sock.close()
            _worker_process(worker_settings, worker_end, index, run)
        worker_end.close()
        channels.append(parent_end)
        pids.append(pid)
    return run(_supervise(settings, worker_settings, channels, pids, reserved))


def _worker_process(settings: Settings, channel: socket.socket, index: int, run: Runner) -> None:
    code = 1
    try:
        code = run(_worker_main(settings, channel))
        # drained: a late signal (the parent forwards what the whole group may also have got) changes nothing
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)  # never the parent's exit path (atexit handlers, its sockets)


async def _worker_main(settings: Settings, channel: socket.socket) -> int:
    stop = asyncio.Event()
    # the parent gone means no more tokens: drain and stop rather than serve until the token expires
    flow = settings.auth.flow.value

    def make_authorizer(observer: TokenObserver) -> ChannelAuthorizer:
        return ChannelAuthorizer(channel, flow, observer=observer, on_lost=stop.set)

    sock = reuse_port_socket(settings.listen.host, settings.listen.port)
    return await serve(settings, make_authorizer=make_authorizer, stop=stop, sock=sock, whole_process=True)


async def _supervise(
    settings: Settings,
    worker_settings: Settings,
    channels: list[socket.socket],
    pids: list[int],
    reserved: socket.socket,
) -> int:
    broker = TokenBroker(channels)  # it tells every worker of each identity-provider call (their /metrics)
    authorizer = build_authorizer(settings, observer=broker.observe)
    assert not authorizer.takes_caller_bearer, "config refuses workers > 1 for per-caller flows"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    alive = set(pids)
    failed = False
    try:
        await broker.start(authorizer)
        await authorizer.start()
        warn_if_exposed(settings)
        host = settings.listen.host
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "sidecar listening on http://%s:%d -> %s (flow %s, %d workers)",
            shown,
            worker_settings.listen.port,
            settings.upstream.url,
            settings.auth.flow.value,
            len(pids),
        )
        while not stop.is_set() and not failed:
            for pid, status in _reap(alive):
                log.error("worker %d exited unexpectedly (%s); stopping the sidecar", pid, _describe(status))
                failed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        failed = await _stop_workers(alive, settings.shutdown_grace + 5.0) or failed
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for pid in alive:  # only after a failure above: nothing may outlive the parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await broker.aclose()
        await authorizer.aclose()
        reserved.close()
    log.info("stopped")
    return 1 if failed else 0


async def _stop_workers(alive: set[int], grace: float) -> bool:
    """SIGTERM every worker, wait for them to drain; True if any did not exit cleanly."""
    failed = False
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while alive and asyncio.get_running_loop().time() < deadline:
        for pid, status in _reap(alive):
            if os.waitstatus_to_exitcode(status) != 0:
                log.warning("worker %d stopped with %s", pid, _describe(status))
                failed = True
        await asyncio.sleep(0.05)
    if alive:
        log.warning("%d worker(s) still running after the grace period; killing them", len(alive))
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(40):  # SIGKILL is not ignorable: they are gone within moments
            _reap(alive)
            if not alive:
                break
            await asyncio.sleep(0.05)
        failed = True
    return failed


def _reap(alive: set[int]) -> list[tuple[int, int]]:
    """Workers that have exited (removed from `alive`), with their wait status."""
    exited = []
    for pid in list(alive):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            alive.discard(pid)
            exited.append((pid, status))
    return exited


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit code {code}"
