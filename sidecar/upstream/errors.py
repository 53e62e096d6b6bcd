"""What can go wrong with the upstream; the proxy turns each into its JSON answer (sidecar/proxy.py)."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class ConnectError(UpstreamError):
    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class ConnectionLost(UpstreamError):
    pass


class ProtocolError(UpstreamError):
    pass
