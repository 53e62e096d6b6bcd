"""Configuration: the only place that knows key names, env names and defaults, and the only place that reads
the environment (azure-identity's DefaultAzureCredential and ManagedIdentityCredential read their own).

Sources, strongest first: environment (`SIDECAR_` prefix, `__` between nested keys), then the YAML file
(`--config` or `SIDECAR_CONFIG`), then the defaults below. Some defaults come from the environment too: the
workload identity webhook's AZURE_* variables, XDG_CACHE_HOME for the sign-in cache, IDENTITY_ENDPOINT.

`auth` is one model per flow, chosen by `auth.flow` (a discriminated union): each holds exactly its flow's keys
and checks them itself; shared keys live in the base classes (AuthBase, EntraAppAuth, ConfidentialClientAuth,
UserSignInAuth).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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


def _readable_file(value: Path) -> Path:
    if not os.access(value, os.R_OK):
        raise ValueError(f"cannot read {str(value)!r}: check the path and the file's permissions")
    return value


def _authority_shape(value: str) -> str:
    if not value.startswith("https://"):
        raise ValueError(f"must be an https:// URL such as {PUBLIC_AUTHORITY}, got {value!r}")
    return value.rstrip("/")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]
AuthorityHost = Annotated[str, AfterValidator(_authority_shape)]
Identifier = Annotated[str, AfterValidator(_not_blank)]


def default_token_cache_path() -> Path:
    """Where device_code / interactive keep their sign-in unless auth.token_cache_path says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sidecar" / "msal_token_cache.json"


class AuthBase(_Section):
    """What every flow has: the scope it asks for and how early it renews."""

    flow: Flow
    scope: str
    refresh_margin: float = Field(300.0, ge=0)

    # What to say when one of the flow's required keys is absent, by key (else a generic line).
    missing_hints: ClassVar[dict[str, str]] = {}

    @field_validator("scope")
    @classmethod
    def _scope_shape(cls, value: str) -> str:
        if not value.strip() or " " in value.strip():
            raise ValueError("must be one scope such as api://<api-app-id>/.default")
        return value.strip()

    @property
    def audience(self) -> str:
        """The resource the scope asks for: `api://x/.default` -> `api://x`."""
        scope = self.scope
        return scope.rsplit("/", 1)[0] if "/" in scope.split("://", 1)[-1] else scope

    def secret_values(self) -> list[str]:
        """The configured secret values of this flow, for the log redactor."""
        return []


class EntraAppAuth(AuthBase):
    """The msal flows: an app registration in a tenant, at an authority."""

    tenant_id: Identifier
    client_id: Identifier
    authority_host: AuthorityHost = PUBLIC_AUTHORITY

    @property
    def is_public_cloud(self) -> bool:
        return self.authority_host == PUBLIC_AUTHORITY


_CLIENT_CREDENTIAL_KEYS = ("client_secret", "client_secret_file", "certificate_path")


class ConfidentialClientAuth(EntraAppAuth):
    """An app that proves itself with exactly one of a secret, a secret file or a certificate."""

    client_secret: SecretStr | None = None
    # re-read when it changes (rotation)
    client_secret_file: ReadableFile | None = None
    # a PEM with the private key and the certificate
    certificate_path: ReadableFile | None = None
    certificate_password: SecretStr | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> ConfidentialClientAuth:
        given = [key for key in _CLIENT_CREDENTIAL_KEYS if getattr(self, key) is not None]
        problems = []
        if len(given) != 1:
            what = "none" if not given else " and ".join(f"auth.{k}" for k in given)
            problems.append(
                f"auth.client_secret: auth.flow={self.flow.value} needs exactly one of auth.client_secret, "
                f"auth.client_secret_file, auth.certificate_path (got {what})"
            )
        if self.certificate_password is not None and self.certificate_path is None:
            problems.append(
                "auth.certificate_password: only used with auth.certificate_path (an encrypted private key); "
                "remove it or set auth.certificate_path"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def secret_values(self) -> list[str]:
        values = [s.get_secret_value() for s in (self.client_secret, self.certificate_password) if s is not None]
        if self.client_secret_file is not None:
            with contextlib.suppress(OSError):
                values.append(read_secret_file(self.client_secret_file))
        return values


class ClientCredentialsAuth(ConfidentialClientAuth):
    flow: Literal[Flow.CLIENT_CREDENTIALS]


class OnBehalfOfAuth(ConfidentialClientAuth):
    flow: Literal[Flow.ON_BEHALF_OF]
    # how many users' exchanged tokens to keep
    obo_cache_size: int = Field(10_000, ge=1)


class UserSignInAuth(EntraAppAuth):
    """A person signs in to a public client app; msal's cache (with the refresh token) lives in a file."""

    token_cache_path: Path = Field(default_factory=default_token_cache_path)

    @field_validator("token_cache_path")
    @classmethod
    def _home(cls, value: Path) -> Path:
        return value.expanduser()


class DeviceCodeAuth(UserSignInAuth):
    flow: Literal[Flow.DEVICE_CODE]


class InteractiveAuth(UserSignInAuth):
    flow: Literal[Flow.INTERACTIVE]


class ManagedIdentityAuth(AuthBase):
    """The resource's system-assigned identity, or a user-assigned one named by one of its ids."""

    flow: Literal[Flow.MANAGED_IDENTITY]
    client_id: str | None = None
    object_id: str | None = None
    resource_id: str | None = None
    _identity_endpoint: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _one_identity(self) -> ManagedIdentityAuth:
        named = [key for key in ("client_id", "object_id", "resource_id") if getattr(self, key)]
        if len(named) > 1:
            raise ValueError(
                f"auth.{named[1]}: a user-assigned identity is named by one of auth.client_id, auth.object_id, "
                f"auth.resource_id (got {', '.join('auth.' + k for k in named)})"
            )
        # azure-identity picks the endpoint's protocol from the environment; the sidecar needs to know which one
        # too, because the two name a resource id differently.
        self._identity_endpoint = bool(os.environ.get("IDENTITY_ENDPOINT"))
        return self

    @property
    def identity_endpoint(self) -> bool:
        """IDENTITY_ENDPOINT is set (App Service, Functions, Container Apps, Arc): else the IMDS protocol."""
        return self._identity_endpoint


# key -> the variable the AKS workload identity webhook injects for it
WORKLOAD_IDENTITY_ENV = {
    "tenant_id": "AZURE_TENANT_ID",
    "client_id": "AZURE_CLIENT_ID",
    "federated_token_file": "AZURE_FEDERATED_TOKEN_FILE",
    "authority_host": "AZURE_AUTHORITY_HOST",
}
_WEBHOOK = (
    "the AKS workload identity webhook injects it when the pod is labelled azure.workload.identity/use=true "
    "and its service account is annotated with azure.workload.identity/client-id"
)


class WorkloadIdentityAuth(AuthBase):
    """An AKS pod's projected service-account token, exchanged for an Entra token. Each key not in the config
    comes from the variable the workload identity webhook injects (WORKLOAD_IDENTITY_ENV)."""

    flow: Literal[Flow.WORKLOAD_IDENTITY]
    tenant_id: Identifier
    client_id: Identifier
    # not checked here when it comes from the environment: the kubelet projects it, and a missing one is
    # reported when a token is asked for, with a hint about the pod's label and service account
    federated_token_file: Path
    authority_host: AuthorityHost = PUBLIC_AUTHORITY

    missing_hints: ClassVar[dict[str, str]] = {
        f"auth.{key}": f"set auth.{key}, or {name} in the environment ({_WEBHOOK})"
        for key, name in WORKLOAD_IDENTITY_ENV.items()
    }

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.get("federated_token_file")
        if given is not None:
            try:
                _readable_file(Path(given))
            except ValueError as exc:
                raise ValueError(f"auth.federated_token_file: {exc}") from None
        for key, name in WORKLOAD_IDENTITY_ENV.items():
            if data.get(key) is None and os.environ.get(name):
                data[key] = os.environ[name]
        return data


class AzureCliAuth(AuthBase):
    """The user signed in with `az login`."""

    flow: Literal[Flow.AZURE_CLI]
    # passed as `--tenant`
    tenant_id: str | None = None


class DefaultAuth(AuthBase):
    """azure-identity's DefaultAzureCredential: it reads its own environment variables."""

    flow: Literal[Flow.DEFAULT]
    # the user-assigned managed identity / workload identity to use
    client_id: str | None = None
    tenant_id: str | None = None
    # unset: AZURE_AUTHORITY_HOST, else the public cloud (azure-identity's own default)
    authority_host: AuthorityHost | None = None
    # credentials of the chain to leave out, e.g. [managed_identity]
    exclude_credentials: list[str] = Field(default_factory=list)

    @field_validator("exclude_credentials")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in EXCLUDABLE_CREDENTIALS]
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}; choose from " + ", ".join(EXCLUDABLE_CREDENTIALS))
        return value


# The `auth` section: one model per flow, chosen by auth.flow.
AuthConfig = Annotated[
    ClientCredentialsAuth
    | OnBehalfOfAuth
    | DeviceCodeAuth
    | InteractiveAuth
    | ManagedIdentityAuth
    | WorkloadIdentityAuth
    | AzureCliAuth
    | DefaultAuth,
    Field(discriminator="flow"),
]
_BY_TAG: dict[Flow, type[AuthBase]] = {
    get_args(model.model_fields["flow"].annotation)[0]: model for model in get_args(get_args(AuthConfig)[0])
}
AUTH_MODELS: dict[Flow, type[AuthBase]] = {flow: _BY_TAG[flow] for flow in Flow}


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

    @field_validator("auth", mode="before")
    @classmethod
    def _null_is_unset(cls, value: object) -> object:
        # `key: null` (or `key:` alone) says "no value": the same as leaving the key out, so a config that lists
        # another flow's keys empty, as the example once did, still loads.
        if isinstance(value, dict):
            return {key: item for key, item in value.items() if item is not None}
        return value

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

    def secret_values(self) -> list[str]:
        """Every configured secret value (inbound keys, upstream headers, the flow's credential), so the log
        redactor can scrub them even if a library echoes one."""
        values = [key.get_secret_value() for key in self.inbound.api_keys]
        values += [value.get_secret_value() for value in self.upstream.headers.values()]
        for path in self.upstream.headers_files.values():
            with contextlib.suppress(OSError):
                values.append(read_secret_file(path))
        values += self.auth.secret_values()
        return [value for value in values if value]

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
