"""Shared fixtures: emulators on loopback, sidecars built from a config, and a watch over every log line.

Everything talks over real sockets: the Entra ID emulator (HTTPS, test CA), the secured-upstream emulator,
the sidecar, and the real openai SDK as the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import AUTHORIZER
from sidecar.config import Settings
from sidecar.emulators import Stack, start_stack
from sidecar.server import RunningSidecar, start
from sidecar.tokens.manager import RetryPolicy

FAST_RETRY = RetryPolicy(first_delay=0.1, max_delay=0.5)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*")


class LogWatch(logging.Handler):
    """Keeps every formatted log line of the session; at the end no secret and no token may be in them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.secrets: set[str] = set()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken record must not hide the others
            self.lines.append(repr(record.msg))

    def leaks(self, extra_text: str = "") -> list[str]:
        text = "\n".join(self.lines) + extra_text
        found = [f"a token ({m[:12]}...)" for m in JWT.findall(text)]
        found += [f"the secret {s[:3]}..." for s in self.secrets if s in text]
        return found


_WATCH = LogWatch()


@pytest.fixture(scope="session", autouse=True)
def log_watch() -> Iterator[LogWatch]:
    root = logging.getLogger()
    previous = root.level
    root.addHandler(_WATCH)
    root.setLevel(logging.INFO)
    yield _WATCH
    root.removeHandler(_WATCH)
    root.setLevel(previous)
    leaks = _WATCH.leaks()
    assert not leaks, f"logs of the test session contain {leaks}"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not depend on the machine's environment (SIDECAR_*, Azure identity variables)."""
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with await start_stack(tmp_path / "emulators", stream_delay=0.05, stream_chunks=5) as started:
        _WATCH.secrets.add(started.client_secret)
        yield started


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_for(stack: Stack, **overrides: Any) -> dict[str, Any]:
    """The client-credentials configuration for the emulator stack, as the YAML file would hold it."""
    base = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": stack.upstream_url, "read_timeout": 5},
        "tls": {"ca_bundle": str(stack.ca_pem_path)},
        "auth": {
            "flow": "client_credentials",
            "scope": stack.scope,
            "tenant_id": stack.tenant_id,
            "client_id": stack.client_id,
            "client_secret": stack.client_secret,
            "authority_host": stack.authority_host,
        },
    }
    return merge(base, overrides)


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def run_sidecar() -> AsyncIterator[StartSidecar]:
    """Start sidecars from config dicts; all are stopped after the test."""
    running: list[RunningSidecar] = []

    async def _start(config: dict[str, Any], *, retry: RetryPolicy | None = FAST_RETRY, **kwargs: Any) -> RunningSidecar:
        sidecar = await start(Settings(**config), retry=retry, **kwargs)
        running.append(sidecar)
        return sidecar

    yield _start
    for sidecar in running:
        await sidecar.aclose()


@pytest.fixture
async def sidecar(stack: Stack, run_sidecar: StartSidecar) -> RunningSidecar:
    """A sidecar with client credentials in front of the stack, ready (first token held)."""
    running = await run_sidecar(config_for(stack))
    await wait_ready(running)
    return running


async def wait_ready(sidecar: RunningSidecar, timeout: float = 10.0) -> None:
    authorizer = sidecar.app[AUTHORIZER]
    deadline = asyncio.get_running_loop().time() + timeout
    while not authorizer.is_ready():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("sidecar never became ready")
        await asyncio.sleep(0.01)


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run `python -m sidecar ...` without blocking the loop (the emulators in this process must answer)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    out, err = stdout.decode(), stderr.decode()
    _WATCH.lines.append(err)  # the CLI's log output is log output too
    return process.returncode, out, err
