"""Settings (every section together) and loading them: the YAML file, the environment, and errors that name
the key and the fix."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from sidecar.config import cgroup
from sidecar.config.auth import AUTH_MODELS, AuthConfig
from sidecar.config.network import NetworkConfig
from sidecar.config.routes import RouteConfig, default_route
from sidecar.config.sections import (
    CONFIG_PATH_ENV,
    ENV_PREFIX,
    AdminConfig,
    ConfigError,
    Flow,
    InboundConfig,
    ListenConfig,
    LoggingConfig,
    TelemetryConfig,
    TlsConfig,
    UpstreamConfig,
    read_key_file,
    read_secret_file,
    without_nulls,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: ListenConfig = Field(default_factory=ListenConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    routes: list[RouteConfig] = Field(default_factory=list)  # before upstream: its check reads them
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    auth: AuthConfig
    inbound: InboundConfig = Field(default_factory=InboundConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    shutdown_grace: float = Field(25.0, ge=0)
    # Serving processes sharing the listening port; one of them never multiplies identity-provider calls
    # (the parent owns the token and hands it to the workers). "auto" is one per CPU.
    workers: int | Literal["auto"] = 1

    @field_validator("auth", mode="before")
    @classmethod
    def _null_is_unset(cls, value: object) -> object:
        # a config that lists another flow's keys empty, as the example once did, still loads
        return without_nulls(value)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_value(cls, value: object, info: ValidationInfo) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            value = "auto"
        elif isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64):
            raise ValueError(f"must be a number of processes from 1 to 64, or auto (got {value!r})")
        auth = info.data.get("auth")
        if value != 1 and auth is not None and auth.flow is Flow.ON_BEHALF_OF:
            raise ValueError("on_behalf_of gets a token per caller, which workers cannot share: use workers: 1")
        scopes = {route.scope for route in info.data.get("routes") or () if route.scope}
        if value != 1 and auth is not None and scopes - {auth.scope}:
            # the parent shares auth.scope's token with the workers; other scopes would be fetched per worker
            raise ValueError("a route with a scope other than auth.scope needs workers: 1 (workers share one token)")
        return value  # type: ignore[return-value]

    @field_validator("admin")
    @classmethod
    def _own_port(cls, admin: AdminConfig, info: ValidationInfo) -> AdminConfig:
        listen = info.data.get("listen")
        wildcards = {"0.0.0.0", "::", ""}
        if (
            listen is not None
            and admin.port
            and admin.port == listen.port
            and (admin.host == listen.host or {admin.host, listen.host} & wildcards)
        ):
            raise ValueError(
                f"admin.port: {admin.port} is listen.port too; give the admin listener a port of its own (e.g. 9090)"
            )
        return admin

    @field_validator("routes")
    @classmethod
    def _distinct_prefixes(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        prefixes = [route.prefix for route in routes]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("two routes have the same prefix; give each route its own")
        return routes

    @field_validator("upstream")
    @classmethod
    def _an_upstream(cls, upstream: UpstreamConfig, info: ValidationInfo) -> UpstreamConfig:
        if upstream.url is None and not info.data.get("routes"):
            raise ValueError(f"upstream.url: missing; {_HINTS['upstream.url']} (or list routes)")
        return upstream

    def effective_routes(self) -> list[RouteConfig]:
        """The routes to serve, longest prefix first, each with its scope: `routes`, or the one `/openai/` route
        that `upstream` and `auth.scope` form."""
        if not self.routes:
            return [default_route(self.upstream, self.auth.scope)]
        resolved = [r if r.scope else r.model_copy(update={"scope": self.auth.scope}) for r in self.routes]
        return sorted(resolved, key=lambda route: len(route.prefix), reverse=True)

    def secret_values(self) -> list[str]:
        """Every configured secret value (inbound keys, upstream headers, the flow's credential), so the log
        redactor can scrub them even if a library echoes one."""
        values = [key.get_secret_value() for key in self.inbound.api_keys]
        if self.inbound.api_keys_file is not None:
            values += read_key_file(self.inbound.api_keys_file)[0]
        for route in self.effective_routes():
            values += [value.get_secret_value() for value in route.headers.values()]
            for path in route.headers_files.values():
                with contextlib.suppress(OSError):
                    values.append(read_secret_file(path))
        values += self.auth.secret_values()
        values += self.network.secret_values()
        return [value for value in values if value]

    def worker_count(self, machine: cgroup.Limits | None = None) -> int:
        """How many serving processes: `workers`, with "auto" meaning one per CPU the cgroup's quota allows,
        as many as its memory limit holds. An explicit count the memory limit cannot hold is a config error."""
        machine = machine or cgroup.limits()
        fitting = cgroup.fitting_workers(machine.memory_mb)
        if self.workers == "auto":
            return machine.cpus if fitting is None else min(machine.cpus, fitting)
        if fitting is not None and self.workers > fitting:
            needed = cgroup.PARENT_MB + (self.workers - 1) * cgroup.WORKER_MB
            raise ConfigError(
                [
                    f"workers: {self.workers} processes need about {needed} MB and the memory limit is "
                    f"{machine.memory_mb:.0f} MB; use workers: {fitting} or less (or auto), or raise the limit"
                ]
            )
        return int(self.workers)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives through init_settings (see load_config), so env wins over it.
        return (env_settings, _DeepInit(settings_cls, init_settings))


class _DeepInit(PydanticBaseSettingsSource):
    """Init values (the YAML file) as a settings source placed after env, so env overrides the file."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._init = init

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._init()


def _read_yaml(path: Path) -> dict[str, Any]:
    """The file's keys. Not pydantic-settings' YamlConfigSettingsSource: it skips a missing file silently, lets
    a top level that is not a mapping or a YAML error escape as a bare exception, and takes its path from the
    class's model_config, while --config names it per call."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config file {str(path)!r}: cannot read it ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"config file {str(path)!r}: not valid YAML{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {str(path)!r}: must be a mapping of keys (listen, upstream, auth, ...)"])
    return data


_HINTS = {
    "upstream.url": "set upstream.url to the secured proxy, e.g. https://my-func.azurewebsites.net",
    "auth": "set auth.flow and auth.scope",
    "auth.scope": "set auth.scope, e.g. api://<api-app-id>/.default",
}


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "__").upper()


def _flows_using(key: str) -> list[str]:
    return [flow.value for flow, model in AUTH_MODELS.items() if key in model.model_fields]


_FLOW_VALUES = {flow.value for flow in Flow}
_FLOW_CHOICES = "one of " + ", ".join(flow.value for flow in Flow)


def _explain(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors(include_url=False, include_input=False):
        parts = [str(part) for part in item["loc"]]
        # a flow model's errors carry its tag, ('auth', 'client_credentials', 'tenant_id'): users wrote auth.tenant_id
        flow: Flow | None = None
        if len(parts) >= 2 and parts[0] == "auth" and parts[1] in _FLOW_VALUES:
            flow = Flow(parts.pop(1))
        key = ".".join(parts)
        kind = item["type"]
        message = str(item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if kind == "union_tag_not_found":
            lines.append(f"auth.flow: missing; set it to {_FLOW_CHOICES}")
        elif kind == "union_tag_invalid":
            lines.append(f"auth.flow: {item.get('ctx', {}).get('tag')!r} is not a flow; use {_FLOW_CHOICES}")
        elif kind == "missing" and flow is not None:
            hint = AUTH_MODELS[flow].missing_hints.get(key) or _HINTS.get(key)
            hint = hint or f"set it in the config file or {_env_name(key)} in the environment"
            lines.append(f"{key}: missing; auth.flow={flow.value} needs it: {hint}")
        elif kind == "missing":
            hint = _HINTS.get(key, f"set {key} in the config file or {_env_name(key)} in the environment")
            lines.append(f"{key}: missing; {hint}")
        elif kind == "extra_forbidden" and flow is not None and _flows_using(parts[-1]):
            lines.append(
                f"{key}: not used by auth.flow={flow.value}; remove it or change auth.flow "
                f"(it is for {', '.join(_flows_using(parts[-1]))})"
            )
        elif kind == "extra_forbidden":
            lines.append(f"{key}: unknown key; check its spelling against config.example.yaml")
        elif kind == "enum":
            lines.append(f"{key}: {message}")
        elif "\n" in message or message.startswith(("auth.", "upstream.", "routes", "telemetry.", "admin.")):
            # a cross-key rule already names its keys, one per line
            lines.extend(message.splitlines())
        else:
            lines.append(f"{key}: {message}")
    return lines


def load_config(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the file (if any) and the environment; raise ConfigError naming every wrong key."""
    if path is None:
        path = os.environ.get(CONFIG_PATH_ENV) or None
    file_values = _read_yaml(Path(path)) if path else {}
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except SettingsError:
        raise ConfigError(_not_json()) from None


def _not_json() -> list[str]:
    """pydantic-settings' error for a SIDECAR_* list or mapping that is not JSON (SIDECAR_INBOUND__API_KEYS=key)
    names only the section: find the variables themselves."""
    lines = []
    for name, value in os.environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list | dict) and _is_collection(name[len(ENV_PREFIX) :].lower().split("__")):
            lines.append(f'{name}: must be JSON here, e.g. {name}=\'["one", "two"]\' (a list) or \'{{"k": "v"}}\'')
    return lines or ["a SIDECAR_* variable for a list or mapping is not JSON: write it as JSON"]


def _is_collection(path: list[str]) -> bool:
    model: Any = Settings
    for part in path:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
    return get_origin(model) in (list, dict)
