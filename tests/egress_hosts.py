"""A proxy.py plugin for tests/test_egress.py: names under `.test` resolve to loopback inside the proxy only,
so emulators advertised as `emu.test` are reachable through the forward proxy and nowhere else."""

from __future__ import annotations

from proxy.http.proxy import HttpProxyBasePlugin


class MapTestHosts(HttpProxyBasePlugin):
    def resolve_dns(self, host: str, port: int) -> tuple[str | None, None]:
        return ("127.0.0.1" if host.endswith(".test") else None), None
