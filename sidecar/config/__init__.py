"""Configuration: the only place that knows key names, env names and defaults, and the only place that reads
the environment (azure-identity's DefaultAzureCredential and ManagedIdentityCredential read their own, and so do
the OpenTelemetry SDK and its exporter, beyond the endpoint and service name read here).

Sources, strongest first: environment (`SIDECAR_` prefix, `__` between nested keys), then the YAML file
(`--config` or `SIDECAR_CONFIG`), then the defaults. `sections` holds listen, upstream, tls, inbound, logging and
telemetry; `auth` one model per flow (a discriminated union on `auth.flow`); `settings` puts them together and
loads them.
"""

from sidecar.config.auth import (
    AUTH_MODELS,
    EXCLUDABLE_CREDENTIALS,
    WORKLOAD_IDENTITY_ENV,
    AuthBase,
    AuthConfig,
    AzureCliAuth,
    ClientCredentialsAuth,
    ConfidentialClientAuth,
    DefaultAuth,
    DeviceCodeAuth,
    EntraAppAuth,
    InteractiveAuth,
    ManagedIdentityAuth,
    OnBehalfOfAuth,
    UserSignInAuth,
    WorkloadIdentityAuth,
    audience_of,
    default_token_cache_path,
)
from sidecar.config.network import NetworkConfig
from sidecar.config.sections import (
    CONFIG_PATH_ENV,
    ENV_PREFIX,
    PUBLIC_AUTHORITY,
    AdminConfig,
    ConfigError,
    Flow,
    InboundConfig,
    ListenConfig,
    LoggingConfig,
    TelemetryConfig,
    TlsConfig,
    UpstreamConfig,
    is_loopback,
    read_key_file,
    read_secret_file,
)
from sidecar.config.settings import Settings, load_config

__all__ = [
    "AUTH_MODELS",
    "CONFIG_PATH_ENV",
    "ENV_PREFIX",
    "EXCLUDABLE_CREDENTIALS",
    "PUBLIC_AUTHORITY",
    "WORKLOAD_IDENTITY_ENV",
    "AdminConfig",
    "AuthBase",
    "AuthConfig",
    "AzureCliAuth",
    "ClientCredentialsAuth",
    "ConfidentialClientAuth",
    "ConfigError",
    "DefaultAuth",
    "DeviceCodeAuth",
    "EntraAppAuth",
    "Flow",
    "InboundConfig",
    "InteractiveAuth",
    "ListenConfig",
    "LoggingConfig",
    "ManagedIdentityAuth",
    "NetworkConfig",
    "OnBehalfOfAuth",
    "Settings",
    "TelemetryConfig",
    "TlsConfig",
    "UpstreamConfig",
    "UserSignInAuth",
    "WorkloadIdentityAuth",
    "audience_of",
    "default_token_cache_path",
    "is_loopback",
    "load_config",
    "read_key_file",
    "read_secret_file",
]
