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
  Authorizer interface, as its observer, and traces its identity-provider calls when tracing is on;
- the parent serves the admin listener (bound before the fork), so a probe sees the pod and a scrape adds up
  every worker (sidecar.pod, over a second socketpair per worker); it forwards SIGTERM/SIGINT to them and
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
from dataclasses import dataclass
from typing import Any

from sidecar.config import ConfigError, Settings
from sidecar.health import admin_handler, own_routes
from sidecar.metrics import Metrics
from sidecar.pod import PodMetrics, WorkerFigures, answer_scrapes
from sidecar.server import cannot_listen, serve, start_admin, warn_if_exposed
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
    except OSError as exc:
        sock.close()
        raise cannot_listen("listen", host, port, exc) from None
    return sock


def admin_socket(settings: Settings) -> socket.socket | None:
    """The admin listener's socket, bound and listening before the fork: the parent alone serves it (sidecar/pod.py
    says why), and a port that cannot be had stops the start before any worker exists."""
    host, port = settings.admin.host, settings.admin.port
    if port is None:
        return None
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise cannot_listen("admin", host, port, exc) from None


@dataclass
class _Worker:
    pid: int
    tokens: socket.socket  # the parent's end of its token channel (sidecar/token_channel.py)
    figures: socket.socket  # the parent's end of its metrics channel (sidecar/pod.py)


def run_workers(settings: Settings, count: int, run: Runner) -> int:
    """Fork `count` workers, then supervise them; returns the exit code (0 after a clean drain)."""
    reserved = reuse_port_socket(settings.listen.host, settings.listen.port)
    try:
        admin = admin_socket(settings)
    except ConfigError:
        reserved.close()
        raise
    port = reserved.getsockname()[1]
    worker_settings = settings.model_copy(update={"listen": settings.listen.model_copy(update={"port": port})})
    workers: list[_Worker] = []
    for index in range(count):
        tokens, worker_tokens = socket.socketpair()
        figures, worker_figures = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker: it never returns from here
            parents = (sock for worker in workers for sock in (worker.tokens, worker.figures))
            for sock in (reserved, admin, tokens, figures, *parents):
                if sock is not None:
                    sock.close()
            _worker_process(worker_settings, worker_tokens, worker_figures, index, run)
        worker_tokens.close()
        worker_figures.close()
        workers.append(_Worker(pid, tokens, figures))
    return run(_supervise(settings, worker_settings, workers, reserved, admin))


def _worker_process(settings: Settings, tokens: socket.socket, figures: socket.socket, index: int, run: Runner) -> None:
    code = 1
    try:
        code = run(_worker_main(settings, tokens, figures))
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


async def _worker_main(settings: Settings, tokens: socket.socket, figures: socket.socket) -> int:
    stop = asyncio.Event()
    # the parent gone means no more tokens: drain and stop rather than serve until the token expires
    flow = settings.auth.flow.value

    def make_authorizer(observer: TokenObserver) -> ChannelAuthorizer:
        return ChannelAuthorizer(tokens, flow, observer=observer, on_lost=stop.set)

    metrics = Metrics()
    answering = asyncio.create_task(answer_scrapes(figures, metrics), name="metrics-channel")
    sock = reuse_port_socket(settings.listen.host, settings.listen.port)
    try:
        return await serve(
            settings,
            make_authorizer=make_authorizer,
            stop=stop,
            sock=sock,
            whole_process=True,
            metrics=metrics,
            admin=False,  # the parent serves it for the whole pod
        )
    finally:
        answering.cancel()


async def _supervise(
    settings: Settings,
    worker_settings: Settings,
    workers: list[_Worker],
    reserved: socket.socket,
    admin: socket.socket | None,
) -> int:
    broker = TokenBroker([worker.tokens for worker in workers])
    own = Metrics(process=False)  # the identity-provider calls, made here; the rest is the workers'
    telemetry = None
    observe: TokenObserver = _both(own.observe_token, broker.observe)  # the broker tells every worker
    if settings.telemetry.otlp_endpoint is not None:
        from sidecar.telemetry import Telemetry  # as in build_app: only when tracing is on

        telemetry = Telemetry(settings.telemetry)
        observe = telemetry.observer(observe)  # a span per identity-provider call, here where it is made
    authorizer = build_authorizer(settings, observer=observe)
    assert not authorizer.takes_caller_bearer, "config refuses workers > 1 for per-caller flows"
    own.track_expiry(authorizer.seconds_until_expiry)
    figures = [WorkerFigures(worker.pid, worker.figures) for worker in workers]
    state: dict[str, object] = {"draining": False}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    alive = {worker.pid for worker in workers}
    failed = False
    admin_runner = None
    try:
        if telemetry is not None:
            telemetry.start()
        await broker.start(authorizer)
        if admin is not None:
            handler = admin_handler(own_routes(state, [authorizer], PodMetrics(own, figures).render))
            admin_runner, admin_url = await start_admin(handler, settings, sock=admin)
        await authorizer.start()
        warn_if_exposed(settings)
        host = settings.listen.host
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "sidecar listening on http://%s:%d -> %s (flow %s, %d workers)%s",
            shown,
            worker_settings.listen.port,
            settings.upstream.url,
            settings.auth.flow.value,
            len(workers),
            f"; admin (health, readiness, metrics of the whole pod) on {admin_url}" if admin_runner else "",
        )
        if admin_runner is None:
            log.warning(
                "with %d workers and no admin.port, /metrics on the main port shows only the worker that took the "
                "connection: set admin.port for one scrape of the whole pod",
                len(workers),
            )
        while not stop.is_set() and not failed:
            for pid, status in _reap(alive):
                log.error("worker %d exited unexpectedly (%s); stopping the sidecar", pid, _describe(status))
                failed = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        state["draining"] = True
        failed = await _stop_workers(alive, settings.shutdown_grace + 5.0) or failed
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for pid in alive:  # only after a failure above: nothing may outlive the parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if admin_runner is not None:
            await admin_runner.cleanup()
        elif admin is not None:
            admin.close()
        for each in figures:
            await each.aclose()
        await broker.aclose()
        await authorizer.aclose()
        if telemetry is not None:
            await telemetry.aclose()
        reserved.close()
    log.info("stopped")
    return 1 if failed else 0


def _both(first: TokenObserver, second: TokenObserver) -> TokenObserver:
    def observe(flow: str, outcome: str, seconds: float) -> None:
        first(flow, outcome, seconds)
        second(flow, outcome, seconds)

    return observe


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
