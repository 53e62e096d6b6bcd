"""What the tests share: config for the emulator stack, starting sidecars, running the CLI, the log watch.

A plain module (not conftest) so that test files can import it by a name no other folder uses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.app import AUTHORIZER
from sidecar.server import RunningSidecar
from sidecar.tokens.manager import RetryPolicy
from sidecar_emulators import Stack

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


_WATCH = LogWatch()  # one per test session: the conftest fixture installs and checks it


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
    base = merge(stack.sidecar_config(), {"upstream": {"read_timeout": 5}})
    return merge(base, overrides)


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path, config: dict[str, Any]) -> str:
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def start_serve(
    directory: Path,
    config: dict[str, Any],
    *,
    probe: str = "/readyz",
    also: Callable[[asyncio.subprocess.Process], bool] = lambda process: True,
) -> tuple[asyncio.subprocess.Process, str]:
    """`sidecar serve` as a subprocess on a free port, returned once `probe` says 200 (and `also` holds)."""
    config = merge(config, {"listen": {"port": free_port()}})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", write_config(directory, config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    url = f"http://127.0.0.1:{config['listen']['port']}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url + probe) as response:
                    if response.status == 200 and also(process):
                        return process, url
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    await process.wait()
    raise AssertionError("sidecar serve did not become ready")


async def stop_serve(process: asyncio.subprocess.Process) -> str:
    """Make sure the process is gone; return its stderr (and record it for the log watch)."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    assert process.stderr is not None
    err = (await process.stderr.read()).decode()
    _WATCH.lines.append(err)
    return err
