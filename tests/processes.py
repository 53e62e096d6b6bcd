"""`sidecar serve` with `workers: N` as a subprocess: its worker pids, which one took a connection, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from harness import _WATCH, BODY, CHAT, config_for, start_serve, until

from sidecar_emulators import Stack


async def start_workers(stack: Stack, tmp_path: Path, workers: int = 2, **overrides: object):
    """`sidecar serve` with `workers`, once its port answers /healthz (not waiting for a token)."""
    config = config_for(stack, workers=workers, logging={"format": "json"}, **overrides)
    return await start_serve(
        tmp_path, config, probe="/healthz", also=lambda process: len(worker_pids(process.pid)) == workers
    )


async def stop(process: asyncio.subprocess.Process) -> tuple[int, list[str]]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.wait_for(process.wait(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    lines = (await process.stderr.read()).decode().splitlines()
    _WATCH.lines.extend(lines)
    return code, lines


def worker_pids(parent: int) -> list[int]:
    try:
        return [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    except OSError:
        return []


def connection_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which process holds the server side of the connection from `client_port` (from /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


async def accepted_by(server_port: int, client_port: int, pids: list[int]) -> int:
    """The worker that accepted the connection (it may still sit in the accept queue for a moment)."""
    owners: list[int] = []

    def accepted() -> bool:
        owner = connection_owner(server_port, client_port, pids)
        if owner is not None:
            owners.append(owner)
        return bool(owners)

    await until(accepted, what=f"a worker to accept the connection from port {client_port}")
    return owners[0]


async def post_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> tuple[int, bytes]:
    """One POST on a raw connection: status and body (the sidecar answers with a Content-Length here)."""
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)
