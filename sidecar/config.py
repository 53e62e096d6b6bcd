"""Configuration: the only place that knows key names, env names and defaults.

Sources, strongest first: environment (`SIDECAR_` prefix, `__` between nested keys), then the YAML file
(`--config` or `SIDECAR_CONFIG`), then the defaults below.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SIDECAR_"
CONFIG_PATH_ENV = "SIDECAR_CONFIG"
PUBLIC_AUTHORITY = "https://login.microsoftonline.com"


class ConfigError(Exception):
    """A configuration the sidecar cannot run with; `problems` holds one line per wrong key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Flow(StrEnum):
    CLIENT_CREDENTIALS = "client_credentials"
    DEVICE_CODE = "device_code"
    INTERACTIVE = "interactive"
    ON_BEHALF_OF = "on_behalf_of"
    MANAGED_IDENTITY = "managed_identity"
    WORKLOAD_IDENTITY = "workload_identity"
    AZURE_CLI = "azure_cli"
    DEFAULT = "default"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # A new connection must deliver its first request head within this time (slow-header callers hold sockets).
    header_timeout: float = Field(10.0, gt=0)
    # An idle kept-alive connection is closed after this long (aiohttp's default is about an hour).
    keepalive_timeout: float = Field(75.0, gt=0)
    # Connections past this many are closed at once: the process keeps descriptors for the upstream side.
    max_connections: int = Field(2048, ge=1)


class UpstreamConfig(_Section):
    url: str
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(300.0, gt=0)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    headers_files: dict[str, Path] = Field(default_factory=dict)
    # http:// to anything but loopback sends the token in cleartext: refused unless asked for by name.
    allow_insecure: bool = False
    # Bytes of small request bodies all requests together keep for replaying once after an upstream 401.
    replay_buffer: int = Field(64 * 1024 * 1024, ge=0)

    @model_validator(mode="after")
    def _cleartext_only_on_loopback(self) -> UpstreamConfig:
        from yarl import URL

        url = URL(self.url)
        if url.scheme == "http" and not self.allow_insecure and not is_loopback(url.host or ""):
            raise ValueError(
                f"upstream.url: http:// to {url.host} would send the bearer token in cleartext; use https://, "
                "or set upstream.allow_insecure: true if the network path is protected otherwise"
            )
        return self

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        from yarl import URL

        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http(s) URL such as https://my-func.azurewebsites.net, got {value!r}")
        if url.query_string or url.fragment:
            raise ValueError("must not carry a query string or fragment")
        return value.rstrip("/")


class TlsConfig(_Section):
    ca_bundle: Path | None = None

    @field_validator("ca_bundle")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {str(value)!r}: point it at a PEM file of trusted CA certificates")
        return value


EXCLUDABLE_CREDENTIALS = (
    "environment",
    "workload_identity",
    "managed_identity",
    "shared_token_cache",
    "visual_studio_code",
    "azure_cli",
    "azure_developer_cli",
    "azure_powershell",
)
_SECRET_KEYS = ("client_secret", "client_secret_file", "certificate_path")
_CONFIDENTIAL_FLOWS = {Flow.CLIENT_CREDENTIALS, Flow.ON_BEHALF_OF}
_NEEDS_TENANT_AND_CLIENT = {Flow.CLIENT_CREDENTIALS, Flow.ON_BEHALF_OF, Flow.DEVICE_CODE, Flow.INTERACTIVE}


class AuthConfig(_Section):
    flow: Flow
    scope: str
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    certificate_path: Path | None = None
    certificate_password: SecretStr | None = None
    authority_host: str = PUBLIC_AUTHORITY
    refresh_margin: float = Field(300.0, ge=0)
    token_cache_path: Path | None = None
    # managed identity: a user-assigned identity may be named by one of these (client_id above, too)
    object_id: str | None = None
    resource_id: str | None = None
    # workload identity: the webhook's variables, overridable here
    federated_token_file: Path | None = None
    # on-behalf-of: how many users' tokens to keep
    obo_cache_size: int = Field(10_000, ge=1)
    # on-behalf-of: the sidecar app's Application ID URI when it is not api://<client_id>; callers' tokens
    # with this audience are accepted too (besides <client_id> and api://<client_id>)
    app_id_uri: str | None = None
    # default: DefaultAzureCredential's credentials to leave out, e.g. [managed_identity]
    exclude_credentials: list[str] = Field(default_factory=list)

    @field_validator("scope")
    @classmethod
    def _scope_shape(cls, value: str) -> str:
        if not value.strip() or " " in value.strip():
            raise ValueError("must be one scope such as api://<api-app-id>/.default")
        return value.strip()

    @field_validator("authority_host")
    @classmethod
    def _authority_shape(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(f"must be an https:// URL such as {PUBLIC_AUTHORITY}, got {value!r}")
        return value.rstrip("/")

    @field_validator("client_secret_file", "certificate_path", "federated_token_file")
    @classmethod
    def _file_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {str(value)!r}: check the path and the file's permissions")
        return value

    @model_validator(mode="after")
    def _flow_needs(self) -> AuthConfig:
        problems: list[str] = []
        if self.flow in _NEEDS_TENANT_AND_CLIENT:
            for key in ("tenant_id", "client_id"):
                if not getattr(self, key):
                    problems.append(f"auth.{key}: required for auth.flow={self.flow.value}")
        given = [key for key in _SECRET_KEYS if getattr(self, key) is not None]
        if self.flow in _CONFIDENTIAL_FLOWS:
            if len(given) != 1:
                what = "none" if not given else " and ".join(f"auth.{k}" for k in given)
                problems.append(
                    f"auth.client_secret: auth.flow={self.flow.value} needs exactly one of auth.client_secret, "
                    f"auth.client_secret_file, auth.certificate_path (got {what})"
                )
        elif given:
            problems.append(f"auth.{given[0]}: not used by auth.flow={self.flow.value}; remove it or change auth.flow")
        if self.flow is Flow.MANAGED_IDENTITY:
            named = [key for key in ("client_id", "object_id", "resource_id") if getattr(self, key)]
            if len(named) > 1:
                problems.append(
                    f"auth.{named[1]}: a user-assigned identity is named by one of auth.client_id, auth.object_id, "
                    f"auth.resource_id (got {', '.join('auth.' + k for k in named)})"
                )
        unknown = [name for name in self.exclude_credentials if name not in EXCLUDABLE_CREDENTIALS]
        if unknown:
            problems.append(
                f"auth.exclude_credentials: unknown {', '.join(unknown)}; choose from "
                + ", ".join(EXCLUDABLE_CREDENTIALS)
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def is_public_cloud(self) -> bool:
        return self.authority_host == PUBLIC_AUTHORITY

    @property
    def audience(self) -> str:
        """The resource the scope asks for: `api://x/.default` -> `api://x`."""
        scope = self.scope
        return scope.rsplit("/", 1)[0] if "/" in scope.split("://", 1)[-1] else scope


class InboundConfig(_Section):
    api_keys: list[SecretStr] = Field(default_factory=list)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    access_log: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: ListenConfig = Field(default_factory=ListenConfig)
    upstream: UpstreamConfig
    tls: TlsConfig = Field(default_factory=TlsConfig)
    auth: AuthConfig
    inbound: InboundConfig = Field(default_factory=InboundConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    shutdown_grace: float = Field(25.0, ge=0)
    # Serving processes sharing the listening port; one of them never multiplies identity-provider calls
    # (the parent owns the token and hands it to the workers). "auto" is one per CPU.
    workers: int | Literal["auto"] = 1

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
        return value  # type: ignore[return-value]

    def worker_count(self) -> int:
        """How many serving processes: `workers`, with "auto" meaning one per usable CPU."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
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
    "auth.flow": "one of " + ", ".join(f.value for f in Flow),
    "auth.scope": "set auth.scope, e.g. api://<api-app-id>/.default",
}


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "__").upper()


def _explain(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors(include_url=False, include_input=False):
        key = ".".join(str(part) for part in item["loc"])
        kind = item["type"]
        message = str(item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if kind == "missing":
            hint = _HINTS.get(key, f"set {key} in the config file or {_env_name(key)} in the environment")
            lines.append(f"{key}: missing; {hint}")
        elif kind == "extra_forbidden":
            lines.append(f"{key}: unknown key; check its spelling against config.example.yaml")
        elif kind == "enum":
            lines.append(f"{key}: {message}")
        elif "\n" in message or message.startswith(("auth.", "upstream.")):
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


def read_secret_file(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()
