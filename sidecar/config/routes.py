"""`routes`: path prefixes, each with its upstream backend(s), its scope and its static headers.

Without `routes`, `upstream.url` + `auth.scope` (+ `upstream.headers`) form the one `/openai/` route, so a
configuration written before routes existed means what it meant. The prefix is the only part of a request's
path the sidecar interprets; the request gate (sidecar/gate.py) applies to each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from sidecar.config.sections import _Section, cleartext_problem, http_url

DEFAULT_PREFIX = "/openai/"


class BackendConfig(_Section):
    url: str
    priority: int = Field(0, ge=0)  # lower first; backends of one priority take turns
    name: str | None = None  # the metrics label and log name; default: its index in the list

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value)


class RouteConfig(_Section):
    prefix: str
    upstream: list[BackendConfig]  # one URL, a list of URLs, or a list of {url, priority, name}
    scope: str | None = None  # default: auth.scope
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    headers_files: dict[str, Path] = Field(default_factory=dict)
    allow_insecure: bool = False
    # the cheap authenticated GET of `sidecar check --upstream` and the start-up check (None: not probed)
    probe_path: str | None = None

    @field_validator("upstream", mode="before")
    @classmethod
    def _backends(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [{"url": item} if isinstance(item, str) else item for item in items]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or not value.endswith("/") or "//" in value or ".." in value:
            raise ValueError(f"must be a path that starts and ends with /, such as /openai/ or /models/, got {value!r}")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or " " in value.strip()):
            raise ValueError("must be one scope such as api://<api-app-id>/.default")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _named_and_safe(self) -> RouteConfig:
        if not self.upstream:
            raise ValueError("upstream: give at least one URL")
        names = [backend.name or str(index) for index, backend in enumerate(self.upstream)]
        if len(set(names)) != len(names):
            raise ValueError("upstream: backend names must differ (they label metrics and logs)")
        object.__setattr__(
            self, "upstream", [b.model_copy(update={"name": n}) for b, n in zip(self.upstream, names, strict=True)]
        )
        if not self.allow_insecure:
            for backend in self.upstream:
                problem = cleartext_problem(backend.url, f"routes[{self.prefix}].upstream", "allow_insecure")
                if problem:
                    raise ValueError(problem)
        return self


def default_route(upstream: Any, scope: str) -> RouteConfig:
    """The route a configuration without `routes` means: `upstream.*` and `auth.scope` under /openai/."""
    return RouteConfig(
        prefix=DEFAULT_PREFIX,
        upstream=[BackendConfig(url=upstream.url, name="0")],
        scope=scope,
        headers=upstream.headers,
        headers_files=upstream.headers_files,
        allow_insecure=upstream.allow_insecure,
        probe_path="/openai/models?api-version=2024-10-21",
    )
