"""What the tests share: the log watch, config for the emulator stack, waiting for events, the CLI as a
subprocess (one command or a whole `sidecar serve`) and the openai SDK as apps configure it.

A plain module (not conftest) so that test files can import it by a name no other folder uses. Per-flow
set-ups (fake `az`, browser, rigs) are in tests/rigs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openai import AsyncAzureOpenAI

from sidecar import logs
from sidecar.app import AUTHORIZER
from sidecar.server import RunningSidecar
from sidecar.tokens.manager import RetryPolicy
from sidecar_emulators import Stack

FAST_RETRY = RetryPolicy(first_delay=0.1, max_delay=0.5)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*")
API_VERSION = "2024-06-01"
CHAT = f"/openai/deployments/gpt-4o-mini/chat/completions?api-version={API_VERSION}"
BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'
STREAM_BODY = b'{"stream": true, "messages": [{"role": "user", "content": "hi"}]}'

# Variables through which azure-identity (and msal) find a credential: none may leak in from the machine.
IDENTITY_ENV = (
    "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT",
    "MSI_SECRET", "AZURE_POD_IDENTITY_AUTHORITY_HOST", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_USERNAME",
    "AZURE_PASSWORD", "AZURE_TOKEN_CREDENTIALS", "BROWSER",
)  # fmt: skip


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


@contextlib.contextmanager
def configured_logging(fmt: str, secrets: Iterable[str] = ()) -> Iterator[io.StringIO]:
    """sidecar.logs.configure() as `serve` runs it, writing to the returned buffer instead of stderr.

    configure() replaces the root logger's handlers: the session's log watch is off meanwhile (what is logged
    here is the test's to check, tokens included) and is put back after, with the levels configure() set."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in ("msal", "azure", "urllib3", "aiohttp.access")}
    stream = io.StringIO()
    real_stderr, sys.stderr = sys.stderr, stream  # configure() hands sys.stderr to its handler
    try:
        logs.configure("INFO", fmt, secrets)
    finally:
        sys.stderr = real_stderr
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was in quieted.items():
            logging.getLogger(name).setLevel(was)


# -- configuration ------------------------------------------------------------------------------------------------


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_for(
    stack: Stack, flow: str = "client_credentials", *, auth: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """A sidecar config in front of the stack's upstream, as the YAML file would hold it.

    client_credentials and on_behalf_of use the stack's own app registration (tenant, client id, secret,
    authority); any other flow starts from its name and the scope. `auth` is merged into the auth section,
    `overrides` into the whole."""
    config = merge(stack.sidecar_config(), {"upstream": {"read_timeout": 5}})
    if flow not in ("client_credentials", "on_behalf_of"):
        config["auth"] = {"scope": stack.scope}
    config["auth"] = {**config["auth"], "flow": flow}
    return merge(merge(config, {"auth": auth or {}}), overrides)


def write_config(path: Path, config: dict[str, Any] | str) -> str:
    """Write a config file (a dict as YAML, or the text as it is); returns its path for --config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> None:
    """This process's identity variables: exactly `env` (for sidecars run in-process)."""
    for name in IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)


def clean_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without identity variables, plus `extra`: the environment of every CLI subprocess."""
    env = {name: value for name, value in os.environ.items() if name not in IDENTITY_ENV}
    env.update(extra or {})
    return env


# -- waiting for events ---------------------------------------------------------------------------------------


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0, what: str = "condition", every: float = 0.01
) -> None:
    """Wait for `condition` (plain or async) to hold. The deadline is generous on purpose: it only bounds how
    long a failing test takes; a test that passes never waits for it."""
    deadline = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


async def wait_ready(sidecar: RunningSidecar, timeout: float = 30.0) -> None:
    await until(sidecar.app[AUTHORIZER].is_ready, timeout, what="the sidecar to hold a token")


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


# -- the CLI as a subprocess ------------------------------------------------------------------------------------


class Cli:
    """`python -m sidecar ...` whose stderr is read as it streams, so a test can act on a line (a device code)
    while the command still runs. The environment is clean_environ(env)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = ""
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Cli:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            env=clean_environ(env),
        )  # fmt: skip
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr += line.decode()

    async def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def printed() -> bool:
            if (match := re.search(pattern, self.stderr)) is not None:
                found.append(match)
                return True
            if self.process.returncode is not None and self._reader.done():
                raise AssertionError(f"the command ended without printing {pattern!r}; stderr:\n{self.stderr}")
            return False

        try:
            await until(printed, timeout, what=f"{pattern!r} on stderr")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stderr so far:\n{self.stderr}") from None
        return found[0]

    async def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for the command to end: (exit code, stdout, stderr)."""
        assert self.process.stdout is not None
        try:
            stdout = await asyncio.wait_for(self.process.stdout.read(), timeout)
            await asyncio.wait_for(self.process.wait(), timeout)
            await self._reader
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            _WATCH.lines.append(self.stderr)  # the CLI's log output is log output too
        assert self.process.returncode is not None
        return self.process.returncode, stdout.decode(), self.stderr


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run one command to its end without blocking the loop (the emulators in this process must answer)."""
    return await (await Cli.start(*args, env=env)).finish(timeout)


def claims_printed(out: str) -> dict[str, str]:
    """`sidecar check` prints claims as `  name   value` rows."""
    return dict(re.findall(r"^  (\w+) +(.+)$", out, flags=re.MULTILINE))


async def start_serve(
    directory: Path,
    config: dict[str, Any],
    *,
    probe: str = "/readyz",
    also: Callable[[asyncio.subprocess.Process], bool] = lambda process: True,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[asyncio.subprocess.Process, str]:
    """`sidecar serve` as a subprocess on a free port, returned once `probe` says 200 (and `also` holds)."""
    config = merge(config, {"listen": {"port": free_port()}})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--config", write_config(directory / "sidecar.yaml", config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_environ(env),
    )  # fmt: skip
    url = f"http://127.0.0.1:{config['listen']['port']}"
    async with aiohttp.ClientSession() as http:

        async def answers() -> bool:
            if process.returncode is not None:
                raise AssertionError(f"sidecar serve exited with {process.returncode}")
            try:
                async with http.get(url + probe) as response:
                    return response.status == 200 and also(process)
            except aiohttp.ClientConnectionError:
                return False

        try:
            await until(answers, timeout, what=f"sidecar serve to answer {probe} with 200", every=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stderr:\n{await stop_serve(process)}") from None
        except BaseException:
            await stop_serve(process)
            raise
    return process, url


async def stop_serve(process: asyncio.subprocess.Process) -> str:
    """Make sure the process is gone; return its stderr (and record it for the log watch)."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    assert process.stderr is not None
    err = (await process.stderr.read()).decode()
    _WATCH.lines.append(err)
    return err


# -- the openai SDK -------------------------------------------------------------------------------------------


def sdk(url: str, **kwargs: Any) -> AsyncAzureOpenAI:
    """The openai SDK as apps configure it against the sidecar; no retries, so every answer is visible."""
    if "azure_ad_token" not in kwargs:
        kwargs.setdefault("api_key", "unused-by-the-sidecar")
    return AsyncAzureOpenAI(azure_endpoint=url, api_version=API_VERSION, max_retries=0, **kwargs)


async def chat(client: AsyncAzureOpenAI) -> str:
    """One chat completion; the upstream emulator's reply names the token it saw (aud, oid, appid)."""
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    return completion.choices[0].message.content or ""


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def post_chat(
    http: aiohttp.ClientSession, url: str, *, token: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """One chat completion POSTed to the sidecar at `url` (as the caller `token`, if given): the status, the
    headers and the JSON body."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(url + CHAT, data=BODY, headers=headers) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/readyz") as response:
        return response.status, await response.json()
