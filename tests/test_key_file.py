"""`inbound.api_keys_file`: inbound keys in a file that is read again when it changes, so keys rotate without a
restart, and a file that breaks later never opens the gate.

Over real sockets with the openai SDK as the caller. The file changes as operators and Kubernetes change it: a
new file renamed over the old one, and the kubelet's swap of a mounted Secret's `..data` symlink.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path

import aiohttp
import openai
import pytest
import websockets
from harness import _WATCH, StartSidecar, chat, config_for, post_chat, sdk, until, wait_ready
from processes import start_workers, stop

from sidecar.gate import RECHECK_SECONDS, InboundKeys
from sidecar_emulators import Stack

KEY_A = "key-a-3f9c2e7d41b8a6f0"
KEY_B = "key-b-8e1d0c5a92f7b346"  # as long as KEY_A: a swap that keeps the size must still be seen
CONFIG_KEY = "key-from-config-5b7e19d2"
ALL_KEYS = (KEY_A, KEY_B, CONFIG_KEY)
SWAP_DEADLINE = 15.0  # generous: the file is looked at about once a second


@pytest.fixture(autouse=True)
def keys_are_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _WATCH.secrets.update(ALL_KEYS)  # the session's log watch fails on them too


class KeysOnDisk:
    """An `inbound.api_keys_file` changed the way operators do: a new file written beside it and renamed over
    it, truncated in place, deleted."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.path = directory / "keys"

    def write(self, text: str) -> None:
        temporary = self.path.with_name(".keys.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)

    def empty(self) -> None:
        self.path.write_text("", encoding="utf-8")

    def remove(self) -> None:
        self.path.unlink()


class SecretVolume(KeysOnDisk):
    """A Secret mounted by the kubelet: `keys` -> `..data/keys`, `..data` -> `..<timestamp>/`. An update writes a
    new timestamped directory, renames a fresh `..data` symlink over the old one and deletes the old directory;
    a key taken out of the Secret leaves `keys` dangling."""

    def write(self, text: str | None) -> None:
        directory = self.path.parent
        version = directory / f"..{time.time_ns()}"
        version.mkdir()
        if text is not None:
            (version / "keys").write_text(text, encoding="utf-8")
        data = directory / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        os.symlink(version.name, directory / "..data_tmp")
        os.replace(directory / "..data_tmp", data)
        if previous is not None:
            shutil.rmtree(directory / previous)
        if not self.path.is_symlink():
            self.path.symlink_to(Path("..data") / "keys")

    def empty(self) -> None:
        self.write("")

    def remove(self) -> None:
        self.write(None)


LAYOUTS = {"renamed-file": KeysOnDisk, "kubernetes-secret": SecretVolume}


@pytest.fixture(params=list(LAYOUTS))
def keys_on_disk(request: pytest.FixtureRequest, tmp_path: Path) -> KeysOnDisk:
    return LAYOUTS[request.param](tmp_path / "secret")


async def answer(url: str, key: str) -> int:
    """The status the openai SDK, configured with this api key, gets for one chat completion."""
    client = sdk(url, api_key=key)
    try:
        await chat(client)
        return 200
    except openai.APIStatusError as exc:
        assert not any(k in exc.response.text for k in ALL_KEYS)  # the refusal quotes no key
        return exc.status_code
    finally:
        await client.close()


async def keyless(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        status, _, _ = await post_chat(http, url)
    return status


async def keys_admitted(url: str) -> list[str]:
    return [key for key in ALL_KEYS if await answer(url, key) == 200]


async def until_admitted(url: str, expected: list[str]) -> None:
    async def admitted() -> bool:
        return await keys_admitted(url) == expected

    await until(admitted, SWAP_DEADLINE, what=f"exactly {expected} to be admitted", every=0.1)


async def stays_admitted(url: str, expected: list[str]) -> None:
    """The admitted keys do not move for three re-check intervals of requests."""
    deadline = time.monotonic() + 3 * RECHECK_SECONDS
    while time.monotonic() < deadline:
        assert await keys_admitted(url) == expected
        await asyncio.sleep(0.1)


def key_file_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and "inbound.api_keys_file" in r.getMessage()]


def assert_no_key_logged(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert not [key for key in ALL_KEYS if key in text]


async def test_keys_rotate_when_the_file_is_replaced(
    stack: Stack, run_sidecar: StartSidecar, keys_on_disk: KeysOnDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys from the file and from inbound.api_keys both admit; a new file's keys replace the old file's within
    seconds, with no restart; the config's own keys are untouched by the swap."""
    keys_on_disk.write(f"# rotated by the platform team\n\n  {KEY_A}  \n")
    config = config_for(stack, inbound={"api_keys": [CONFIG_KEY], "api_keys_file": str(keys_on_disk.path)})
    running = await run_sidecar(config)
    await wait_ready(running)
    assert await keys_admitted(running.url) == [KEY_A, CONFIG_KEY]
    assert await answer(running.url, "# rotated by the platform team") == 401  # a comment line is no key
    assert key_file_records(caplog, logging.INFO) == [f"inbound.api_keys_file {keys_on_disk.path}: 1 keys loaded"]

    keys_on_disk.write(f"{KEY_B}\n")
    swapped = time.monotonic()
    await until_admitted(running.url, [KEY_B, CONFIG_KEY])
    print(f"{type(keys_on_disk).__name__}: new keys admitted {time.monotonic() - swapped:.2f} s after the swap")
    assert await answer(running.url, KEY_A) == 401
    assert key_file_records(caplog, logging.INFO)[1:] == [
        f"inbound.api_keys_file {keys_on_disk.path} changed: 1 keys loaded"
    ]
    assert stack.upstream.requests and all(
        key not in str(dict(r.headers)) for r in stack.upstream.requests for key in ALL_KEYS
    )  # no key is forwarded upstream
    assert_no_key_logged(caplog)


async def test_a_file_that_breaks_keeps_the_last_keys_and_warns_once(
    stack: Stack, run_sidecar: StartSidecar, keys_on_disk: KeysOnDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """Mid-rotation or by mistake the file goes empty or away: the last keys read keep guarding (never "no key
    needed"), with one warning per change of the file, not one per request; keys written again take over."""
    keys_on_disk.write(KEY_A + "\n")
    running = await run_sidecar(config_for(stack, inbound={"api_keys_file": str(keys_on_disk.path)}))
    await wait_ready(running)
    keys_on_disk.write(KEY_B + "\n")
    await until_admitted(running.url, [KEY_B])

    keys_on_disk.empty()
    await until(lambda: key_file_records(caplog, logging.WARNING), SWAP_DEADLINE, what="a warning")
    await stays_admitted(running.url, [KEY_B])
    assert await keyless(running.url) == 401  # no key at all is still refused
    (empty,) = key_file_records(caplog, logging.WARNING)
    assert f"'{keys_on_disk.path}' holds no key" in empty and "keeping the 1 keys read before" in empty

    keys_on_disk.remove()
    await until(lambda: len(key_file_records(caplog, logging.WARNING)) == 2, SWAP_DEADLINE, what="a 2nd warning")
    await stays_admitted(running.url, [KEY_B])
    assert await keyless(running.url) == 401
    missing = key_file_records(caplog, logging.WARNING)[1]
    assert f"cannot read '{keys_on_disk.path}' (No such file or directory)" in missing
    assert len(key_file_records(caplog, logging.WARNING)) == 2, "one warning per change, not per look"

    keys_on_disk.write(f"{KEY_A}\n{KEY_B}\n")  # both, as in the middle of a rotation
    await until_admitted(running.url, [KEY_A, KEY_B])
    assert key_file_records(caplog, logging.INFO)[-1] == (
        f"inbound.api_keys_file {keys_on_disk.path} changed: 2 keys loaded"
    )
    assert_no_key_logged(caplog)


async def test_websocket_upgrades_follow_the_rotated_keys(
    stack: Stack, run_sidecar: StartSidecar, tmp_path: Path
) -> None:
    keys_on_disk = SecretVolume(tmp_path / "secret")
    keys_on_disk.write(KEY_A)
    running = await run_sidecar(config_for(stack, inbound={"api_keys_file": str(keys_on_disk.path)}))
    await wait_ready(running)

    async def realtime(key: str) -> int:
        """101 when the SDK's realtime client gets its session, else the status the handshake was refused with."""
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=running.url,
            api_version="2025-04-01-preview",
            websocket_base_url=running.url.replace("http://", "ws://", 1) + "/openai",
            api_key=key,
        )
        try:
            async with client.realtime.connect(model="gpt-4o-realtime-preview") as connection:
                assert (await connection.recv()).type == "session.created"
            return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        finally:
            await client.close()

    assert (await realtime(KEY_A), await realtime(KEY_B)) == (101, 401)
    keys_on_disk.write(KEY_B)

    async def rotated() -> bool:
        return (await realtime(KEY_A), await realtime(KEY_B)) == (401, 101)

    await until(rotated, SWAP_DEADLINE, what="the realtime handshake to take the new key only", every=0.1)


def test_requests_never_touch_the_file_and_a_swap_is_known_by_more_than_its_mtime(tmp_path: Path) -> None:
    """A request only reads the keys in memory: a swapped file counts once the watch looks (refresh), and not
    before. A new file with the same size and the same mtime as the old one is still seen (another inode)."""
    path = tmp_path / "keys"
    path.write_text(KEY_A)
    mtime = path.stat().st_mtime_ns
    keys = InboundKeys([], bearer_is_key=True, key_file=path)
    replacement = tmp_path / "keys.new"
    replacement.write_text(KEY_B)
    os.utime(replacement, ns=(mtime, mtime))
    os.replace(replacement, path)
    assert path.stat().st_mtime_ns == mtime and path.stat().st_size == len(KEY_A)

    assert keys.admit({"api-key": KEY_A}) and not keys.admit({"api-key": KEY_B})
    keys.refresh()
    assert keys.admit({"api-key": KEY_B}) and not keys.admit({"api-key": KEY_A})


def test_key_file_format(tmp_path: Path) -> None:
    """One key per line, whitespace around it stripped (CRLF, a byte order mark); blank lines and lines starting
    with # skipped; a # inside a line belongs to the key."""
    path = tmp_path / "keys"
    path.write_bytes(b"\xef\xbb\xbfkey-zero\r\n# team-a, until June\r\n\r\n  key-one \t\r\n key#two\r\n   # indented\n")
    keys = InboundKeys([], bearer_is_key=True, key_file=path)
    candidates = ("key-zero", "key-one", "key#two", "key", "# team-a, until June", "# indented", "")
    assert [k for k in candidates if keys.admit({"api-key": k})] == ["key-zero", "key-one", "key#two"]
    assert keys.admit({"Authorization": "Bearer key-one"})


async def test_every_worker_of_sidecar_serve_rotates(stack: Stack, tmp_path: Path) -> None:
    """`sidecar serve` with two workers: each process watches the file; its log says what was loaded (a count,
    never a key) once per worker."""
    keys_on_disk = SecretVolume(tmp_path / "secret")
    keys_on_disk.write(KEY_A)
    process, url = await start_workers(stack, tmp_path, workers=2, inbound={"api_keys_file": str(keys_on_disk.path)})
    try:

        async def every_time(expected: list[str]) -> bool:
            # a new connection per request: the kernel spreads them over both workers
            for _ in range(20):
                if await keys_admitted(url) != expected:
                    return False
            return True

        await until(lambda: every_time([KEY_A]), SWAP_DEADLINE, what="both workers to admit KEY_A only")
        keys_on_disk.write(KEY_B)
        await until(lambda: every_time([KEY_B]), SWAP_DEADLINE, what="both workers to admit KEY_B only")
    finally:
        code, lines = await stop(process)
    assert code == 0
    messages = [json.loads(line)["message"] for line in lines if line.startswith("{")]
    assert messages.count(f"inbound.api_keys_file {keys_on_disk.path}: 1 keys loaded") == 2
    assert messages.count(f"inbound.api_keys_file {keys_on_disk.path} changed: 1 keys loaded") == 2
    assert not [key for key in ALL_KEYS if key in "\n".join(lines)]
