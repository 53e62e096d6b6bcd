"""The benchmark's emulator process: the project's Entra ID emulator and upstream emulator, on loopback.

Prints one JSON line once both listen (ports, CA, a token minted for the direct variant). Then it answers
lines on stdin: `stats` (the identity provider's token-request count), `streams <delay> <events>` (the shape
of the next SSE streams), `reset` (drop the recorded requests, collect garbage), `script <JSON list>` (queue
one-shot upstream faults, see `scripted`); it stops on EOF or SIGTERM.
The direct variant's token is minted outside the token endpoint, so the count is the sidecar's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
import tempfile
from typing import Any

from yarl import URL

from sidecar_emulators import Scripted, start_stack

# The Scripted constructors `script` may name; anything else is plain Scripted(**fields).
PRESETS = {"rate_limited": Scripted.rate_limited, "stream_reset": Scripted.stream_reset}


def scripted(fields: dict[str, Any]) -> Scripted:
    """One `script` item: Scripted's fields as JSON (`body` as text), or `preset` and that constructor's."""
    fields = dict(fields)
    if "body" in fields:
        fields["body"] = str(fields["body"]).encode()
    preset = fields.pop("preset", None)
    return PRESETS[preset](**fields) if preset else Scripted(**fields)


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with tempfile.TemporaryDirectory(prefix="bench-emulators-") as tmpdir:
        stack = await start_stack(
            tmpdir,
            token_lifetime=args.token_lifetime,
            stream_delay=args.stream_delay,
            stream_chunks=args.stream_chunks,
        )
        async with stack:
            token, _ = stack.entra.mint_app_token(
                client_id=stack.client_id, oid="bench-direct", audience=stack.audience
            )
            details = {
                "entra_url": stack.authority_host,
                "tenant_id": stack.tenant_id,
                "client_id": stack.client_id,
                "client_secret": stack.client_secret,
                "scope": stack.scope,
                "ca_pem_path": str(stack.ca_pem_path),
                "upstream_port": URL(stack.upstream_url).port,
                "upstream_url": stack.upstream_url,
                "direct_token": token,
            }
            gc.collect()
            gc.freeze()  # start-up objects out of the collector's way: fewer, shorter pauses mid-measurement
            print(json.dumps(details), flush=True)
            reader = await _commands()
            stopped = asyncio.create_task(stop.wait())
            while not stop.is_set():
                line_task = asyncio.create_task(reader.readline())
                await asyncio.wait({line_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not line_task.done():
                    line_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await line_task
                    break
                line = line_task.result()
                if not line:  # the orchestrator went away: stop with it
                    break
                words = line.split()
                if words[:1] == [b"streams"] and len(words) == 3:  # streams <delay s> <events>
                    stack.upstream.stream_delay = float(words[1])
                    stack.upstream.stream_chunks = int(words[2])
                    print(json.dumps({"stream_delay": float(words[1]), "stream_chunks": int(words[2])}), flush=True)
                elif line.strip() == b"reset":  # before each measurement: same state, no garbage pending
                    stack.upstream.requests.clear()
                    stack.upstream.stream_events.clear()
                    gc.collect()
                    print(json.dumps({"reset": True}), flush=True)
                elif words[:1] == [b"script"]:  # script <JSON list of faults>, matched by path
                    stack.upstream.script(*(scripted(item) for item in json.loads(line.split(None, 1)[1])))
                    print(json.dumps({"pending_script": len(stack.upstream.pending_script)}), flush=True)
                elif line.strip() == b"stats":
                    stats = {
                        "token_requests": stack.entra.token_requests,
                        "upstream_requests": len(stack.upstream.requests),
                        "streams_closed_early": stack.upstream.streams_closed_early,
                        "pending_script": len(stack.upstream.pending_script),
                    }
                    stack.upstream.requests.clear()  # the bench's many requests must not pile up here
                    print(json.dumps(stats), flush=True)
            stopped.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--token-lifetime", type=float, default=3600)
    parser.add_argument("--stream-delay", type=float, default=0.2)
    parser.add_argument("--stream-chunks", type=int, default=40)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency of the project
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
