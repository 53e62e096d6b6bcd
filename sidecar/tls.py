"""Make `tls.ca_bundle` win for every outbound TLS connection, whatever the environment says.

`requests` (under msal) lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's `verify`, as corporate
laptops set them; passing `verify` on each request is the only form the environment cannot override.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

# msal waits this long for the identity provider; a hung provider must not pin a thread forever.
IDP_TIMEOUT = (10.0, 30.0)


class PinnedCASession(requests.Session):
    """A requests session whose CA bundle (when configured) and egress proxy (as config resolved it for the
    target: network.proxy, HTTPS_PROXY, NO_PROXY, never loopback or IMDS) are passed explicitly on every request,
    where the environment cannot override them."""

    def __init__(
        self,
        ca_bundle: Path | None,
        timeout: tuple[float, float] = IDP_TIMEOUT,
        proxy_for: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__()
        self._ca_bundle = str(ca_bundle) if ca_bundle else None
        self._timeout = timeout
        self._proxy_for = proxy_for

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if self._ca_bundle is not None:
            kwargs["verify"] = self._ca_bundle
        if self._proxy_for is not None:
            proxy = self._proxy_for(url.decode() if isinstance(url, bytes) else url)
            kwargs["proxies"] = {"http": proxy, "https": proxy}  # None: direct, whatever HTTPS_PROXY says
        kwargs.setdefault("timeout", self._timeout)
        return super().request(method, url, *args, **kwargs)


def client_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The context for aiohttp clients: the configured bundle, else the system store (honours SSL_CERT_FILE)."""
    if ca_bundle is not None:
        return ssl.create_default_context(cafile=str(ca_bundle))
    return ssl.create_default_context()
