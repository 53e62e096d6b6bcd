"""The azure-identity adapter the managed_identity, workload_identity, azure_cli and default flows share: any
asyncio credential as a TokenProvider, its failures as IdentityErrors of one line with a hint.

azure-identity (with cryptography) is ~12 MB of resident memory: the flow modules import this module inside
their build(), so a sidecar on another flow never loads it."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

from azure.core.credentials import AccessTokenInfo
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError

from sidecar.config import Settings
from sidecar.tokens._msal import HINTS, aadsts_code
from sidecar.tokens.base import AccessToken, IdentityError, TokenProvider

# azure-identity logs every failure at WARNING, chains with all their reasons over many lines; the manager (serve)
# and the CLI (check) report each failure once, as one line with a hint, so its own copy is only noise.
logging.getLogger("azure.identity").setLevel(logging.ERROR)

CredentialFactory = Callable[[], AsyncTokenCredential]
# What to tell the operator when the credential is unavailable, given its one-line message.
Hint = Callable[[str], str | None]


class AzureIdentityProvider(TokenProvider):
    """Any azure-identity async credential as a TokenProvider for one scope.

    A new credential is built for every fetch and closed right after it. azure-identity's credentials keep
    their own token cache and hand the cached token back until it is within five minutes of expiry (and for
    30 s after any request), so one long-lived credential would answer the manager's proactive refresh, and
    the refresh after the upstream rejected a token, with the very token it wants replaced.

    `chain`: the credential tries several others (DefaultAzureCredential), so an authentication error may be
    any of theirs and the unavailable hint applies to it too.
    """

    def __init__(
        self, flow: str, make_credential: CredentialFactory, scope: str, *, hint: Hint, chain: bool = False
    ) -> None:
        self.flow = flow
        self._make_credential = make_credential
        self._scope = scope
        self._hint = hint
        self._chain = chain
        self._open: set[AsyncTokenCredential] = set()
        self._closed = False

    async def fetch(self) -> AccessToken:
        if self._closed:
            raise IdentityError("the sidecar is shutting down", retryable=False)
        try:
            credential = self._make_credential()
        except ValueError as exc:  # azure-identity validates its arguments and environment here
            message = _first_line(str(exc))
            raise IdentityError(message, retryable=False, hint=self._hint(message)) from None
        self._open.add(credential)
        try:
            info: AccessTokenInfo = await credential.get_token_info(self._scope)  # type: ignore[attr-defined]
        except CredentialUnavailableError as exc:
            message = _summary(exc.message or str(exc))
            raise IdentityError(message, retryable=True, hint=self._hint(message)) from None
        except ClientAuthenticationError as exc:
            text = str(exc.message or exc)
            code = aadsts_code(text)
            message = _summary(text)
            hint = HINTS.get(code or "") or (self._hint(message) if self._chain else None)
            raise IdentityError(message, code=code, retryable=True, hint=hint) from None
        finally:
            self._open.discard(credential)
            # closing releases the credential's aiohttp session at once, not when the garbage collector
            # gets to it ("Unclosed client session"); a cancelled fetch (shutdown) closes it too
            await credential.close()
        return AccessToken(token=info.token, expires_on=float(info.expires_on), refresh_on=info.refresh_on)

    async def aclose(self) -> None:
        """Close what a fetch still holds: at shutdown the manager may leave one running."""
        self._closed = True
        for credential in list(self._open):
            with contextlib.suppress(Exception):
                await credential.close()
        self._open.clear()


def _first_line(text: str) -> str:
    for line in text.replace("\r", "").splitlines():
        if line.strip():
            return line.strip()
    return text.strip() or "authentication failed"


_ATTEMPTED = re.compile(r"^\t(\w+): (.*)$")


def _summary(text: str) -> str:
    """One line. For a credential chain (DefaultAzureCredential) the reasons of the credentials it tried are on
    the following lines: keep each one's first sentence, since they are the whole point of the message."""
    first = _first_line(text)
    reasons = []
    for line in text.replace("\r", "").splitlines():
        match = _ATTEMPTED.match(line)
        if match:
            name, reason = match.group(1), match.group(2).strip()
            reason = reason.removeprefix(name).strip().split(". ", 1)[0].rstrip(".")
            reasons.append(f"{name}: {reason}")
    if not reasons:
        return first
    return first.rstrip(".") + " (tried " + "; ".join(reasons) + ")"


def transport_options(settings: Settings, *, talks_to: str | None = None) -> dict[str, Any]:
    """`tls.ca_bundle` reaches azure-core's aiohttp transport as connection_verify; the egress proxy config
    resolved for the identity provider (`talks_to`, its https URL) as azure-core's `proxies`. Managed identity
    endpoints are loopback or IMDS, which config never proxies."""
    options: dict[str, Any] = {}
    if settings.tls.ca_bundle:
        options["connection_verify"] = str(settings.tls.ca_bundle)
    proxy = settings.network.proxy_for(talks_to) if talks_to else None
    if proxy:
        options["proxies"] = {"https": proxy}
    return options
