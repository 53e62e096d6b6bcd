"""Checking the caller's token as a middle tier must, before on-behalf-of spends an identity-provider call on it.

A token is accepted when it is a JWT signed (RS256) by one of the tenant's keys, issued by the configured tenant,
addressed to this API (`aud` = the sidecar's client id, `api://<client id>` or `auth.app_id_uri`) and within its
validity window. The keys come from the tenant's OpenID discovery document (`jwks_uri`), fetched with aiohttp on
the loop and the same TLS settings as every other outbound call (`tls.ca_bundle` wins over the environment).

Whose problem a failure is decides its status: a bad token is the caller's (401, not retryable, the reason in
one line and never the token); keys that cannot be fetched are the sidecar's (503, retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt

from sidecar.claims import unverified_claims
from sidecar.config import NetworkConfig, OnBehalfOfAuth, TlsConfig
from sidecar.tls import IDP_TIMEOUT, client_ssl_context
from sidecar.tokens.base import IdentityError, mark_retrieved

log = logging.getLogger("sidecar.tokens")

# nbf and iat may be this far in the future: a token used the moment Entra issued it must not be refused
# because this host's clock lags Entra's by a few seconds. exp gets no leeway: a cached exchange ends at the
# caller's exp, so accepting a token past it would mean one exchange per request until the leeway ran out, and
# MSAL-based clients renew tokens 5 minutes before they expire, so a token past exp is a replay or a client bug.
CLOCK_SKEW = 60.0
# An unknown kid (a rotated key, or a forged token) refetches the keys at most this often.
REFETCH_INTERVAL = 60.0
# Keys are refetched (on the next token) once this old, so a key the tenant withdrew stops being trusted.
KEYS_MAX_AGE = 24 * 3600.0
# While no keys are held, the fetch is retried in the background with this capped backoff, and a request
# retries it itself when the last attempt is this old: an outage costs the IdP one fetch per pause, not one per
# request, and the sidecar recovers within a pause of the IdP's return.
RETRY_FIRST, RETRY_MAX = 1.0, 60.0
FAILED_FETCH_PAUSE = 5.0
_MAX_DOCUMENT = 1 << 20  # a discovery document or JWKS is a few KiB
_ALGORITHM = "RS256"  # Entra signs access tokens with RS256 only
_PUBLIC_CLOUD_V1 = "https://sts.windows.net/{tenant}/"
_SIGNATURE = "the caller's token's signature does not verify against the tenant's keys"


def refused(reason: str) -> IdentityError:
    """The caller's token is not one this API accepts: 401, and asking again with it cannot help."""
    return IdentityError(reason, code="InvalidUserToken", retryable=False, status=401)


def _shown(value: object) -> str:
    """A claim value for a message: printable, short (it comes from the caller)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text if len(text) <= 80 else text[:77] + "...")


class CallerTokenValidator:
    """Validates callers' tokens against the tenant's published keys, which it fetches and caches."""

    def __init__(
        self,
        auth: OnBehalfOfAuth,
        tls: TlsConfig,
        *,
        network: NetworkConfig | None = None,
        refetch_interval: float = REFETCH_INTERVAL,
        keys_max_age: float = KEYS_MAX_AGE,
    ) -> None:
        self.discovery_url = f"{auth.authority_host}/{auth.tenant_id}/v2.0/.well-known/openid-configuration"
        audiences = [auth.client_id, f"api://{auth.client_id}", auth.app_id_uri]
        self.audiences = tuple(dict.fromkeys(a for a in audiences if a))
        self._public_cloud = auth.is_public_cloud
        self._ssl = client_ssl_context(tls.ca_bundle)
        self._proxy_for = network.proxy_for if network is not None else None
        self._refetch_interval = refetch_interval
        self._keys_max_age = keys_max_age
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._issuers: tuple[str, ...] = ()
        self._fetched_at = 0.0  # monotonic time of the last successful fetch
        self._attempted_at: float | None = None  # ... and of the last attempt, successful or not
        self._fetching: asyncio.Future[None] | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._retry_task: asyncio.Task[None] | None = None
        # Set only while no keys are held (nobody can be served): a failed refetch while keys are held answers
        # that one request with 503 but must not take the whole pod out of service.
        self.last_error: IdentityError | None = None

    async def start(self) -> None:
        """Fetch the keys in the background, retrying until they arrive, so the first caller does not wait."""
        if self._retry_task is None:
            self._retry_task = asyncio.create_task(self._fetch_until_held(), name="caller-token-keys")

    async def aclose(self) -> None:
        for task in (self._retry_task, self._fetch_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`, or IdentityError: 401 when the token is bad, 503 when the sidecar
        cannot get the tenant's keys."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise refused("the caller's token is not a JWT (expected an access token for this API)") from None
        algorithm = header.get("alg")
        if algorithm != _ALGORITHM:
            raise refused(
                f"the caller's token is signed with alg {_shown(algorithm)}, not {_ALGORITHM} as Entra signs tokens"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise refused("the caller's token names no signing key (kid)")
        key = await self._key(kid)
        if key is None:
            raise refused(_SIGNATURE)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[_ALGORITHM],
                audience=self.audiences,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iss", "aud"], "verify_iss": False},
            )
        except jwt.ExpiredSignatureError:
            raise refused("the caller's token has expired") from None
        except jwt.ImmatureSignatureError:
            raise refused("the caller's token is not valid yet (nbf or iat is in the future)") from None
        except jwt.InvalidSignatureError:
            raise refused(_SIGNATURE) from None
        except jwt.InvalidAudienceError:
            audience = unverified_claims(token).get("aud")
            expected = ", ".join(repr(a) for a in self.audiences)
            raise refused(
                f"the caller's token's audience {_shown(audience)} is not this API (expected one of {expected})"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise refused(f"the caller's token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise refused(f"the caller's token is not a valid access token ({type(exc).__name__})") from None
        if claims["exp"] <= time.time():  # PyJWT gave exp the nbf leeway; see CLOCK_SKEW
            raise refused("the caller's token has expired")
        issuers = self._issuers_for(claims)
        if claims["iss"] not in issuers:
            expected = ", ".join(repr(i) for i in issuers)
            issuer = _shown(claims["iss"])
            raise refused(f"the caller's token's issuer {issuer} is not the configured tenant (expected {expected})")
        return claims

    def _issuers_for(self, claims: dict[str, Any]) -> tuple[str, ...]:
        # A multi-tenant authority (organizations) advertises "{tenantid}": the signed tid fills it in.
        tid = claims.get("tid")
        return tuple(i.replace("{tenantid}", tid) if isinstance(tid, str) else i for i in self._issuers)

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None and now - self._fetched_at <= self._keys_max_age:
            return key
        if self._fetching is None:  # else join the fetch on its way: its keys are the newest there are
            if not self._keys:
                if self.last_error is not None and self._since_attempt(now) < FAILED_FETCH_PAUSE:
                    raise self.last_error
            elif self._since_attempt(now) < self._refetch_interval:
                return key  # unknown kid: no refetch yet; a stale key: kept until the next refetch
        try:
            await self._refresh()
        except IdentityError:
            if key is None:
                raise  # maybe a rotated key that cannot be fetched: the sidecar's problem, retryable
            return key  # a stale key is still the newest the tenant is known to publish
        return self._keys.get(kid)

    def _since_attempt(self, now: float) -> float:
        return float("inf") if self._attempted_at is None else now - self._attempted_at

    async def _refresh(self) -> None:
        """Fetch the discovery document and the keys once, however many callers ask."""
        if self._fetching is None:
            self._fetching = asyncio.get_running_loop().create_future()
            self._fetching.add_done_callback(mark_retrieved)  # a fetch whose callers were cancelled
            self._fetch_task = asyncio.create_task(self._fetch_into(self._fetching), name="caller-token-keys-fetch")
        await asyncio.shield(self._fetching)

    async def _fetch_into(self, future: asyncio.Future[None]) -> None:
        self._attempted_at = time.monotonic()
        try:
            discovery = await self._get_json(self.discovery_url)
            issuer, jwks_uri = discovery.get("issuer"), discovery.get("jwks_uri")
            if not isinstance(issuer, str) or not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError("the discovery document has no issuer or no https jwks_uri")
            keyset = jwt.PyJWKSet.from_dict(await self._get_json(jwks_uri))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            error = _fetch_error(self.discovery_url, exc)
            if not self._keys:
                self.last_error = error
            log.warning("cannot fetch the tenant's signing keys: %s", error.one_line())
            if not future.done():
                future.set_exception(error)
        else:
            self._keys = {key.key_id: key for key in keyset.keys if key.key_id}
            self._issuers = self._accepted_issuers(issuer)
            self._fetched_at = time.monotonic()
            self.last_error = None
            log.info("fetched the tenant's signing keys (%d keys)", len(self._keys))
            if not future.done():
                future.set_result(None)
        finally:
            self._fetching = None
            if not future.done():  # cancelled (the sidecar is stopping): release whoever waits
                future.cancel()

    def _accepted_issuers(self, issuer: str) -> tuple[str, ...]:
        # Entra gives APIs v1 access tokens unless their manifest asks for v2: on the public cloud these come
        # from sts.windows.net/<tenant id>/ (the tenant id as the v2 issuer spells it, even if configured by name).
        segments = [part for part in urlsplit(issuer).path.split("/") if part]
        if self._public_cloud and len(segments) == 2 and segments[1] == "v2.0":
            return (issuer, _PUBLIC_CLOUD_V1.format(tenant=segments[0]))
        return (issuer,)

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._session is None:
            connect, read = IDP_TIMEOUT
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(sock_connect=connect, sock_read=read, total=connect + read),
                trust_env=False,  # the egress proxy comes from config (network), as for msal's requests
            )
        proxy = self._proxy_for(url) if self._proxy_for is not None else None
        async with self._session.get(url, headers={"Accept": "application/json"}, proxy=proxy) as response:
            if response.status != 200:
                raise ValueError(f"{url} answered HTTP {response.status}")
            body = await response.content.read(_MAX_DOCUMENT + 1)
        if len(body) > _MAX_DOCUMENT:
            raise ValueError(f"{url} sent more than {_MAX_DOCUMENT} bytes")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError(f"{url} did not send a JSON object")
        return document

    async def _fetch_until_held(self) -> None:
        delay = RETRY_FIRST
        while not self._keys:
            try:
                await self._refresh()
            except IdentityError:
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)


def _fetch_error(url: str, exc: BaseException) -> IdentityError:
    if isinstance(exc, aiohttp.ClientSSLError):
        return IdentityError(
            f"TLS verification failed fetching the tenant's signing keys ({url}): {exc}",
            hint="set tls.ca_bundle to the CA that signs the identity provider's certificate",
        )
    if isinstance(exc, TimeoutError):
        return IdentityError(f"the identity provider did not send the tenant's signing keys in time ({url})")
    what = str(exc) or type(exc).__name__
    return IdentityError(f"cannot fetch the tenant's signing keys ({url}): {what}")
