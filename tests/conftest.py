"""Shared fixtures: emulators on loopback, sidecars built from a config, and a watch over every log line.

Everything talks over real sockets: the Entra ID emulator (HTTPS, test CA), the secured-upstream emulator,
the sidecar, and the real openai SDK as the client. Helpers live in harness.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from harness import _WATCH, FAST_RETRY, LogWatch, StartSidecar, config_for, wait_ready

from sidecar.config import Settings
from sidecar.server import RunningSidecar, start
from sidecar.tokens.manager import RetryPolicy
from sidecar_emulators import Stack, start_stack


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
    """Tests must not depend on the machine's environment (SIDECAR_* variables)."""
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with await start_stack(tmp_path / "emulators", stream_delay=0.05, stream_chunks=5) as started:
        _WATCH.secrets.add(started.client_secret)
        yield started


@pytest.fixture
async def run_sidecar() -> AsyncIterator[StartSidecar]:
    """Start sidecars from config dicts; all are stopped after the test."""
    running: list[RunningSidecar] = []

    async def _start(config: dict, *, retry: RetryPolicy | None = FAST_RETRY, **kwargs: object) -> RunningSidecar:
        sidecar = await start(Settings(**config), retry=retry, **kwargs)  # type: ignore[arg-type]
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
