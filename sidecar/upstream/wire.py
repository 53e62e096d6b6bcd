"""HTTP/1.1 on the wire: a response head, and how its body is framed (RFC 9112 sections 6 and 7)."""

from __future__ import annotations

from sidecar.upstream.errors import ProtocolError

MAX_HEAD = 64 * 1024  # a response head (or a chunk header, or trailers) larger than this is refused

# how a response body ends
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = 1, 2, 3, 4


def parse_head(head: bytes, method: str) -> tuple[int, str, list[tuple[str, str]], int, int, bool]:
    """Status, reason, headers, framing, length and keep-alive from a response head (RFC 9112 section 6.3)."""
    # one decode for the whole head (as aiohttp decodes header values: UTF-8, odd bytes kept as surrogates)
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise ProtocolError(f"the upstream sent a malformed status line {status_line[:80]!r}")
    status = int(code)
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    transfer_encoding = False
    connection = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name or "\t" in name:
            raise ProtocolError(f"the upstream sent a malformed header line {line[:80]!r}")
        value = value.strip(" \t")
        headers.append((name, value))
        if name[0] not in "cCtT":  # none of the three names that decide the framing
            continue
        lowered = name.lower()
        if lowered == "content-length":
            if not (value.isascii() and value.isdigit()) or (length is not None and int(value) != length):
                raise ProtocolError("the upstream sent an invalid Content-Length")
            length = int(value)
        elif lowered == "transfer-encoding":
            transfer_encoding = True
            chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
        elif lowered == "connection":
            connection += "," + value.lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    if method == "HEAD" or status in (204, 304) or status < 200:
        return status, reason, headers, NONE, 0, keep_alive and status != 101
    if transfer_encoding:
        if chunked:
            return status, reason, headers, CHUNKED, 0, keep_alive and length is None
        return status, reason, headers, UNTIL_CLOSE, 0, False
    if length is not None:
        return status, reason, headers, (LENGTH if length else NONE), length, keep_alive
    return status, reason, headers, UNTIL_CLOSE, 0, False


# where a chunked body's decoding stands
_SIZE, _DATA, _DATA_END, _TRAILERS = 0, 1, 2, 3


class ChunkedDecoder:
    """A chunked body decoded as its bytes arrive, in any split; trailers are read and dropped."""

    __slots__ = ("_buffer", "_left", "_state", "done", "extra")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0  # bytes of the current chunk still to come
        self._buffer = b""  # an incomplete size or trailer line
        self.done = False  # the last chunk and the trailers are in
        self.extra = False  # bytes came after the end (the connection is out of step)

    def feed(self, data: bytes) -> bytes:
        """The payload bytes in `data` (b"" if none); raises ProtocolError for a malformed body."""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position, size = 0, len(buffer)
        pieces: list[bytes] = []
        while position < size:
            state = self._state
            if state == _DATA:
                take = min(self._left, size - position)
                pieces.append(buffer[position : position + take])
                position += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                if size - position > MAX_HEAD:
                    raise ProtocolError("a chunk header or trailer from the upstream is too large")
                self._buffer = buffer[position:]
                break
            line = buffer[position:end]
            position = end + 2
            if state == _SIZE:
                try:
                    self._left = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError("the upstream sent a malformed chunk size") from None
                self._state = _DATA if self._left else _TRAILERS
            elif state == _DATA_END:
                if line:
                    raise ProtocolError("a chunk from the upstream did not end with CRLF")
                self._state = _SIZE
            elif not line:  # _TRAILERS: the empty line ends the message
                self.done = True
                self.extra = position < size
                break
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
