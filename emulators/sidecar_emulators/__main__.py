"""``python -m sidecar_emulators``: run Entra + upstream (+ managed identity) until SIGTERM.

Prints one JSON line with the connection details on stdout once everything listens.
Every option can also come from an ``EMULATORS_*`` environment variable (e.g. ``EMULATORS_HOST``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence

from sidecar_emulators.stack import DEMO_AUDIENCE, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, start_stack


def _env(name: str, default: str) -> str:
    return os.environ.get(f"EMULATORS_{name}", default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sidecar_emulators", description=__doc__)
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (0.0.0.0 in containers)")
    parser.add_argument(
        "--public-host",
        default=_env("PUBLIC_HOST", "") or None,
        help="name clients use to reach us; added to the TLS cert and advertised URLs",
    )
    parser.add_argument("--entra-port", type=int, default=int(_env("ENTRA_PORT", "8443")))
    parser.add_argument("--upstream-port", type=int, default=int(_env("UPSTREAM_PORT", "8081")))
    parser.add_argument(
        "--managed-identity-port",
        type=int,
        default=int(_env("MANAGED_IDENTITY_PORT", "8082")),
        help="0 picks a free port; -1 disables the managed identity endpoint",
    )
    parser.add_argument(
        "--ca-path",
        default=_env("CA_PATH", "") or None,
        help="where to write the CA certificate PEM (default: a temp dir)",
    )
    parser.add_argument("--client-id", default=_env("CLIENT_ID", DEMO_CLIENT_ID))
    parser.add_argument("--client-secret", default=_env("CLIENT_SECRET", DEMO_CLIENT_SECRET))
    parser.add_argument("--audience", default=_env("AUDIENCE", DEMO_AUDIENCE))
    parser.add_argument("--base-path", default=_env("BASE_PATH", "/api"))
    parser.add_argument("--token-lifetime", type=float, default=float(_env("TOKEN_LIFETIME", "3600")))
    parser.add_argument("--stream-delay", type=float, default=float(_env("STREAM_DELAY", "0")))
    parser.add_argument("--stream-chunks", type=int, default=int(_env("STREAM_CHUNKS", "5")))
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # not available on Windows
            loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="sidecar-emulators-") as tmpdir:
        stack = await start_stack(
            tmpdir,
            token_lifetime=args.token_lifetime,
            client_id=args.client_id,
            client_secret=args.client_secret,
            audience=args.audience,
            base_path=args.base_path,
            stream_delay=args.stream_delay,
            stream_chunks=args.stream_chunks,
            managed_identity=args.managed_identity_port >= 0,
            host=args.host,
            entra_port=args.entra_port,
            upstream_port=args.upstream_port,
            managed_identity_port=max(0, args.managed_identity_port),
            public_host=args.public_host,
            ca_path=args.ca_path,
        )
        async with stack:
            print(json.dumps(stack.as_dict()), flush=True)
            await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # e.g. port already in use
        print(f"emulators: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
