"""The emulated tenant's directory: applications, users, APIs, and pending sign-ins."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509

# Fixed namespace so the same client id / username always gets the same object id:
# the demo prints stable oids across runs.
_OID_NAMESPACE = uuid.UUID("6f0c1a4e-5b0a-4d7e-9a51-3c2f8e1d7b20")

# Resources every tenant knows without registration.
DEFAULT_RESOURCES: dict[str, tuple[str, ...]] = {
    "https://cognitiveservices.azure.com": ("user_impersonation",),
    "https://graph.microsoft.com": ("User.Read",),
}

# Device-code user codes avoid look-alike characters, like Entra's.
_USER_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def stable_oid(kind: str, name: str) -> str:
    return str(uuid.uuid5(_OID_NAMESPACE, f"{kind}:{name}"))


@dataclass
class ClientApp:
    client_id: str
    oid: str
    display_name: str
    roles: tuple[str, ...]
    public: bool
    secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)
    redirect_uris: tuple[str, ...] = ()
    identifier_uris: tuple[str, ...] = ()


@dataclass
class User:
    username: str
    oid: str
    name: str


@dataclass(frozen=True)
class FederatedCredential:
    issuer: str
    subject: str
    client_id: str


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    username: str | None = None
    declined: bool = False
    redeemed: bool = False


@dataclass
class AuthCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    username: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    expires_at: float
    redeemed: bool = False


@dataclass
class RefreshGrant:
    client_id: str
    username: str
    scope: str
    revoked: bool = False


class Directory:
    """Registrations plus the short-lived grant state (device codes, auth codes, refresh tokens).

    Plain dicts: tests mutate them from the event-loop thread, msal reads them through HTTP.
    """

    def __init__(self, resources: Iterable[str] = ()) -> None:
        self.clients: dict[str, ClientApp] = {}
        self.users: dict[str, User] = {}
        self.resources: dict[str, tuple[str, ...]] = dict(DEFAULT_RESOURCES)
        for resource in resources:
            self.resources.setdefault(resource, ("user_impersonation",))
        self.federations: set[FederatedCredential] = set()
        self.device_codes: dict[str, DeviceCode] = {}  # by device_code
        self.auth_codes: dict[str, AuthCode] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}

    # ---- registrations ----

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None,
        certificate_pem: bytes | None,
        roles: Sequence[str],
        oid: str | None,
        public: bool,
        display_name: str | None,
        redirect_uris: Sequence[str],
        identifier_uris: Sequence[str] = (),
    ) -> ClientApp:
        if public and (secret or certificate_pem):
            raise ValueError("a public client has no secret or certificate")
        certificates = x509.load_pem_x509_certificates(certificate_pem) if certificate_pem else []
        app = ClientApp(
            client_id=client_id,
            oid=oid or stable_oid("sp", client_id),
            display_name=display_name or client_id,
            roles=tuple(roles),
            public=public,
            secret=secret,
            certificates=certificates,
            redirect_uris=tuple(redirect_uris),
            identifier_uris=tuple(identifier_uris),
        )
        self.clients[client_id] = app
        return app

    def register_user(self, username: str, *, oid: str | None, name: str | None) -> User:
        user = User(username=username, oid=oid or stable_oid("user", username), name=name or username)
        self.users[username] = user
        return user

    def user(self, username: str) -> User:
        """The user, registered on first use (tests approve sign-ins for ad-hoc names)."""
        return self.users.get(username) or self.register_user(username, oid=None, name=None)

    def register_resource(self, identifier: str, scopes: Sequence[str]) -> None:
        self.resources[identifier.rstrip("/")] = tuple(scopes)

    def resource_scopes(self, resource: str) -> tuple[str, ...] | None:
        """Delegated scopes of a known resource, or None when no such resource exists.

        Every registered application exposes itself as ``api://{client_id}`` and ``{client_id}``
        (that is what an on-behalf-of middle tier is).
        """
        if resource in self.resources:
            return self.resources[resource]
        bare = resource.removeprefix("api://")
        if bare in self.clients:
            return ("user_impersonation",)
        return None

    # ---- grant state ----

    def new_device_code(self, client_id: str, scope: str, lifetime: float) -> DeviceCode:
        user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
        entry = DeviceCode(
            device_code=secrets.token_urlsafe(48),
            user_code=user_code,
            client_id=client_id,
            scope=scope,
            expires_at=time.time() + lifetime,
        )
        self.device_codes[entry.device_code] = entry
        return entry

    def device_code_by_user_code(self, user_code: str) -> DeviceCode:
        wanted = user_code.replace("-", "").strip().upper()
        for entry in self.device_codes.values():
            if entry.user_code == wanted:
                return entry
        raise KeyError(f"unknown user code {user_code!r}")

    def new_auth_code(self, **fields: object) -> AuthCode:
        entry = AuthCode(code=secrets.token_urlsafe(48), **fields)  # type: ignore[arg-type]
        self.auth_codes[entry.code] = entry
        return entry

    def new_refresh_token(self, client_id: str, username: str, scope: str) -> str:
        token = "0." + secrets.token_urlsafe(96)
        self.refresh_tokens[token] = RefreshGrant(client_id=client_id, username=username, scope=scope)
        return token

    def revoke_refresh_tokens(self, username: str | None) -> int:
        count = 0
        for grant in self.refresh_tokens.values():
            if username is None or grant.username == username:
                grant.revoked = True
                count += 1
        return count
