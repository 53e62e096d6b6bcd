"""`network`: the corporate egress proxy, for the upstream, the identity provider and managed-identity
endpoints alike. `network.proxy` wins; else HTTPS_PROXY / HTTP_PROXY (either case) by the target's scheme, with
NO_PROXY's exceptions. Loopback and the instance metadata service (169.254.169.254) are never proxied: a proxy
could not reach them, and IMDS answers only the machine itself.
"""

from __future__ import annotations

import ipaddress
import os

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from yarl import URL

from sidecar.config.sections import _Section, is_loopback

NEVER_PROXIED = ("169.254.169.254",)


class NetworkConfig(_Section):
    proxy: SecretStr | None = None  # http://[user:password@]host:port; a secret: credentials are never logged
    no_proxy: list[str] = Field(default_factory=list)  # hosts, .suffixes, IPs or CIDRs; NO_PROXY adds to it
    _https_proxy: str | None = PrivateAttr(None)
    _http_proxy: str | None = PrivateAttr(None)
    _bypass: tuple[str, ...] = PrivateAttr(())

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and URL(value.get_secret_value()).scheme not in ("http", "https"):
            raise ValueError("must be an http:// (or https://) URL such as http://proxy.corp.example:3128")
        return value

    @model_validator(mode="after")
    def _from_environment(self) -> NetworkConfig:
        explicit = self.proxy.get_secret_value() if self.proxy is not None else None
        self._https_proxy = explicit or _env("HTTPS_PROXY")
        self._http_proxy = explicit or _env("HTTP_PROXY")
        listed = [item.strip() for item in (_env("NO_PROXY") or "").split(",")]
        self._bypass = tuple(item.lower() for item in (*self.no_proxy, *listed) if item)
        return self

    def proxy_for(self, url: str) -> str | None:
        """The proxy to reach `url` through, or None to connect directly."""
        target = URL(url)
        proxy = self._https_proxy if target.scheme in ("https", "wss") else self._http_proxy
        host = (target.host or "").lower()
        if proxy is None or is_loopback(host) or host in NEVER_PROXIED or _bypassed(host, self._bypass):
            return None
        return proxy

    def secret_values(self) -> list[str]:
        """The proxies' passwords, for the log redactor."""
        return [URL(p).password or "" for p in (self._https_proxy, self._http_proxy) if p and URL(p).password]


def _env(name: str) -> str | None:
    return os.environ.get(name) or os.environ.get(name.lower()) or None


def _bypassed(host: str, rules: tuple[str, ...]) -> bool:
    for rule in rules:
        if rule == "*" or host == rule.lstrip(".") or host.endswith("." + rule.lstrip(".")):
            return True
        if "/" in rule and _in_network(host, rule):
            return True
    return False


def _in_network(host: str, cidr: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
