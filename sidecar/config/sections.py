"""The config sections other than auth, the flow names, and the error every config problem becomes."""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
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


def without_nulls(values: object) -> object:
    """A section's keys minus those set to null: `key: null` (or `key:` alone) means "not set", so defaults and
    the environment still apply."""
    if isinstance(values, dict):
        return {key: value for key, value in values.items() if value is not None}
    return values


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


def http_url(value: str) -> str:
    """An upstream base URL: http(s), a host, no query or fragment; without its trailing slash."""
    from yarl import URL

    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an http(s) URL such as https://my-func.azurewebsites.net, got {value!r}")
    if url.query_string or url.fragment:
        raise ValueError("must not carry a query string or fragment")
    return value.rstrip("/")


def cleartext_problem(value: str, key: str, allow_key: str) -> str | None:
    """Why an http:// URL is refused: anything but loopback would carry the bearer token in cleartext."""
    from yarl import URL

    url = URL(value)
    if url.scheme == "http" and not is_loopback(url.host or ""):
        return (
            f"{key}: http:// to {url.host} would send the bearer token in cleartext; use https://, "
            f"or set {allow_key}: true if the network path is protected otherwise"
        )
    return None


class UpstreamConfig(_Section):
    # required unless `routes` names the upstreams (checked by Settings)
    url: str | None = None
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(300.0, gt=0)
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    headers_files: dict[str, Path] = Field(default_factory=dict)
    # http:// to anything but loopback sends the token in cleartext: refused unless asked for by name.
    allow_insecure: bool = False
    # At start-up, one GET of the models list with the first token, and one log line on what the answer means.
    probe: bool = True
    # Bytes of small request bodies all requests together keep for replaying once after an upstream 401.
    replay_buffer: int = Field(64 * 1024 * 1024, ge=0)

    @model_validator(mode="after")
    def _cleartext_only_on_loopback(self) -> UpstreamConfig:
        problem = (
            None
            if self.url is None or self.allow_insecure
            else cleartext_problem(self.url, "upstream.url", "upstream.allow_insecure")
        )
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)


class TlsConfig(_Section):
    ca_bundle: Path | None = None

    @field_validator("ca_bundle")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {str(value)!r}: point it at a PEM file of trusted CA certificates")
        return value


class InboundConfig(_Section):
    api_keys: list[SecretStr] = Field(default_factory=list)
    # One key per line, re-read when it changes (sidecar/gate.py): keys rotate without a restart.
    api_keys_file: Path | None = None

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _blank_is_a_mistake(cls, value: object) -> object:
        # Path("") is ".": a blank SIDECAR_INBOUND__API_KEYS_FILE would read as "cannot read '.'"
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: set it to the path of a file with one inbound key per line, or remove it")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _holds_keys(cls, value: Path | None) -> Path | None:
        if value is not None and (problem := read_key_file(value)[1]) is not None:
            raise ValueError(f"{problem}; {KEY_FILE_FIX}")
        return value


class AdminConfig(_Section):
    """A second listener for probes and scrapers: /healthz, /readyz and /metrics only, never the proxy.
    Off (no port) by default; the container image turns it on at 0.0.0.0:9090."""

    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=0, le=65535)

    @field_validator("port", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """SIDECAR_ADMIN__PORT=off (or empty, or null) turns off the listener the container image turns on."""
        if isinstance(value, str) and value.strip().lower() in ("", "off", "null", "none"):
            return None
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    access_log: bool = True

    @field_validator("level", "format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        """`debug`, `Debug` and `DEBUG` are one level (SIDECAR_LOGGING__LEVEL=debug is what people type)."""
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "level" else value.strip().lower()


# The standard OpenTelemetry variables the sidecar reads itself; the SDK and its exporter read the rest
# (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _CERTIFICATE, _COMPRESSION, OTEL_RESOURCE_ATTRIBUTES), as
# azure-identity reads its own.
OTEL_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
_OTEL_PROTOCOL_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# importable only with the `otel` extra installed (pip install 'entra-token-sidecar[otel]')
OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")


def _otel_endpoint_from_env() -> str | None:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return os.environ.get(OTEL_ENDPOINT_ENV, "").strip() or None


class TelemetryConfig(_Section):
    """OpenTelemetry traces over OTLP/HTTP (protobuf): off unless an endpoint is set, by this key or by the
    standard OTEL_EXPORTER_OTLP_ENDPOINT (the key wins; `key: null` counts as not set, as everywhere)."""

    # The collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: traces go to <endpoint>/v1/traces.
    otlp_endpoint: str | None = Field(default_factory=_otel_endpoint_from_env, validate_default=True)
    service_name: str = Field(
        default_factory=lambda: os.environ.get(OTEL_SERVICE_NAME_ENV, "").strip() or "sidecar", min_length=1
    )
    # Traces started here (no sampled traceparent from the caller) kept at this ratio; a caller's decision is
    # followed (parent-based sampling).
    sample_ratio: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, values: object) -> object:
        # the example lists `otlp_endpoint: null`: a copy of it must still take OTEL_EXPORTER_OTLP_ENDPOINT
        return without_nulls(values)

    @field_validator("otlp_endpoint", mode="before")
    @classmethod
    def _blank_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from yarl import URL

        url = URL(value.strip())
        if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
            raise ValueError(
                f"must be the collector's http(s) base URL, such as http://otel-collector:4318 (got {value!r}; "
                f"{OTEL_ENDPOINT_ENV} sets it when the config does not)"
            )
        if url.user or url.password:  # the URL is logged; a collector's credentials belong in a header
            raise ValueError("must not carry credentials: put them in OTEL_EXPORTER_OTLP_HEADERS")
        return str(url).rstrip("/")

    @model_validator(mode="after")
    def _exportable(self) -> TelemetryConfig:
        if self.otlp_endpoint is None:
            return self
        for name in _OTEL_PROTOCOL_ENVS:
            protocol = os.environ.get(name, "").strip()
            if protocol and protocol != "http/protobuf":
                raise ValueError(
                    f"telemetry.otlp_endpoint: {name}={protocol} is not supported; the sidecar sends OTLP over "
                    "HTTP (http/protobuf, usually port 4318): unset it or set it to http/protobuf"
                )
        import importlib.util

        try:
            missing = [name for name in OTEL_MODULES if importlib.util.find_spec(name) is None]
        except ModuleNotFoundError:  # not even the opentelemetry namespace
            missing = list(OTEL_MODULES)
        if missing:
            raise ValueError(
                "telemetry.otlp_endpoint: traces need the OpenTelemetry packages, which are not installed: "
                "pip install 'entra-token-sidecar[otel]' (or unset the endpoint and OTEL_EXPORTER_OTLP_ENDPOINT)"
            )
        return self


def read_secret_file(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


KEY_FILE_LIMIT = 1024 * 1024
KEY_FILE_FIX = (
    "it must be a file the sidecar can read holding one inbound key per line (blank lines and lines starting "
    "with # are ignored); fix it or remove inbound.api_keys_file"
)


def read_key_file(path: Path) -> tuple[list[str], str | None]:
    """The keys in an `inbound.api_keys_file` and None; or no keys and why (unreadable, not UTF-8 text, no key
    in it), never quoting the file. A key is a line, surrounding whitespace stripped; blank lines and whole-line
    `#` comments are skipped (a `#` inside a line is part of its key)."""
    try:
        with path.open("rb") as file:
            data = file.read(KEY_FILE_LIMIT + 1)
    except OSError as exc:
        return [], f"cannot read {str(path)!r} ({exc.strerror})"
    if len(data) > KEY_FILE_LIMIT:  # a wrong path (a log, a device): never held in memory whole
        return [], f"{str(path)!r} is larger than {KEY_FILE_LIMIT // 1024} KiB, too large for a file of keys"
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte order mark from a Windows editor is no key
    except UnicodeDecodeError:  # its own message would quote a byte of a key
        return [], f"{str(path)!r} is not UTF-8 text"
    lines = (line.strip() for line in text.splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    return keys, None if keys else f"{str(path)!r} holds no key"
