"""Turn an OAuth ``scope`` parameter into the resource (token audience) and scope names."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar_emulators import aadsts

# Scopes that ask for sign-in artefacts rather than access to a resource.
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})

# Bare scope names ("User.Read") belong to Microsoft Graph, as on the real service.
GRAPH_RESOURCE = "https://graph.microsoft.com"


@dataclass(frozen=True)
class ScopeRequest:
    resource: str | None  # becomes the access token's aud
    names: tuple[str, ...]  # e.g. ("user_impersonation",) or (".default",)
    resource_scopes: tuple[str, ...]  # the full strings, echoed back in the response's "scope"
    oidc: frozenset[str]

    @property
    def is_default(self) -> bool:
        return self.names == (".default",)


def split_scope(scope: str) -> tuple[str, str]:
    """``api://X/user_impersonation`` -> (``api://X``, ``user_impersonation``)."""
    scheme_end = scope.find("://")
    path_start = scheme_end + 3 if scheme_end >= 0 else 0
    slash = scope.rfind("/")
    if slash < path_start:  # no path after the authority: a bare Graph scope name
        if scheme_end >= 0:
            raise aadsts.invalid_scope(scope)
        return GRAPH_RESOURCE, scope
    resource, name = scope[:slash], scope[slash + 1 :]
    if not name:
        raise aadsts.invalid_scope(scope)
    return resource, name


def parse_scope(scope_param: str | None) -> ScopeRequest:
    items = (scope_param or "").split()
    oidc = frozenset(s for s in items if s in OIDC_SCOPES)
    resource: str | None = None
    names: list[str] = []
    full: list[str] = []
    for item in items:
        if item in OIDC_SCOPES:
            continue
        item_resource, name = split_scope(item)
        if resource is not None and item_resource != resource:
            # Entra issues a token for exactly one resource per request.
            raise aadsts.invalid_scope(scope_param or "")
        resource = item_resource
        names.append(name)
        full.append(item)
    if ".default" in names and len(names) > 1:
        raise aadsts.invalid_scope(scope_param or "")
    return ScopeRequest(resource=resource, names=tuple(names), resource_scopes=tuple(full), oidc=oidc)
