"""A lean HTTP/1.1 client for the sidecar's one upstream: a pool of kept-alive connections, bytes untouched.

Why not aiohttp's ClientSession: profiling `sidecar serve` under 64 connections (py-spy, see bench/README.md)
put about 40 % of the sidecar's CPU per request in aiohttp's client (request and response objects, header
merging, tracing hooks, per-read timers). The proxy needs a small part of it: one origin, no redirects, no
cookies, no decompression, no proxies. This module does exactly that on an asyncio Protocol: the request goes
out in one write, the response head is parsed once, the body is handed over as it arrives.

What it keeps from aiohttp's behaviour: the connect timeout; a read timeout that is idle time between bytes,
never a total (suspended while the caller is slow to take the body); Host from the upstream URL; the
request's own framing (Content-Length, or chunked when the length is unknown); responses framed by
Content-Length, chunked or connection close; 1xx answers skipped; a connection reused only after a complete
exchange that both sides agreed to keep alive.
"""

from sidecar.upstream.errors import (
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    ProtocolError,
    ReadTimeout,
    UpstreamError,
)
from sidecar.upstream.pool import Origin, Pool
from sidecar.upstream.response import Response

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "ConnectionLost",
    "Origin",
    "Pool",
    "ProtocolError",
    "ReadTimeout",
    "Response",
    "UpstreamError",
]
