"""`auth`: one model per flow, chosen by `auth.flow` (a discriminated union). Each holds exactly its flow's keys
and checks them itself; shared keys live in the base classes (AuthBase, EntraAppAuth, ConfidentialClientAuth,
UserSignInAuth). Some defaults come from the environment: the workload identity webhook's AZURE_* variables,
XDG_CACHE_HOME for the sign-in cache, IDENTITY_ENDPOINT for managed identity."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from sidecar.config.sections import PUBLIC_AUTHORITY, Flow, _Section, read_secret_file

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


def audience_of(scope: str) -> str:
    """The resource a scope asks for: `api://x/.default` -> `api://x`."""
    return scope.rsplit("/", 1)[0] if "/" in scope.split("://", 1)[-1] else scope


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
        return audience_of(self.scope)

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
    # the sidecar app's Application ID URI when it is not api://<client_id>; callers' tokens with this
    # audience are accepted too (besides <client_id> and api://<client_id>)
    app_id_uri: str | None = None


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
