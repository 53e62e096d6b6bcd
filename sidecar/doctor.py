"""The upstream doctor: one cheap authenticated request to the upstream, and one line that says what its answer
means. The most common misconfiguration (a wrong audience, a missing app role: upstream 401/403) otherwise shows
only when the first real request fails; `sidecar check --upstream` and `serve`'s start-up say it first.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass

from yarl import URL

from sidecar.claims import unverified_claims
from sidecar.upstream import ConnectError, ConnectTimeout, Pool, ReadTimeout, UpstreamError

# Lists the deployments' models: cheap, read-only, and served by Azure OpenAI and the Function proxies alike.
PROBE_PATH = "/openai/models?api-version=2024-10-21"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    ok: bool
    line: str


async def probe(pool: Pool, upstream_url: str, path: str, token: str, expected_audience: str) -> Diagnosis:
    """GET `path` with the token; explain the outcome. `pool` is the app's (or a short-lived) transport."""
    url = upstream_url.rstrip("/") + path
    host = URL(upstream_url).host
    try:
        response = await pool.request("GET", path, [("Authorization", "Bearer " + token)], body=b"")
        try:
            body = await response.read()
        finally:
            response.close()
    except ConnectError as exc:
        return Diagnosis(False, f"upstream unreachable: cannot connect to {host} ({_tls_hint(exc.os_error)})")
    except ConnectTimeout:
        return Diagnosis(False, f"upstream unreachable: connecting to {host} timed out (upstream.connect_timeout)")
    except ReadTimeout:
        return Diagnosis(False, f"upstream silent: {host} sent no answer to GET {url} within upstream.read_timeout")
    except UpstreamError as exc:
        return Diagnosis(False, f"upstream error: {host}: {exc}")
    return explain(response.status, body, url, token, expected_audience)


def explain(status: int, body: bytes, url: str, token: str, expected_audience: str) -> Diagnosis:
    claims = unverified_claims(token)
    if 200 <= status < 300:
        return Diagnosis(True, f"upstream ok: GET {url} answered {status}{_models(body)}")
    if status == 401:
        audience = claims.get("aud", "unknown")
        return Diagnosis(
            False,
            f"upstream rejected the token (401): it was issued for audience {audience!r} (auth.scope asks for "
            f"{expected_audience!r}); check that auth.scope names the upstream's Application ID URI",
        )
    if status == 403:
        granted = ", ".join(str(x) for x in (claims.get("roles") or [])) or "none"
        scopes = claims.get("scp") or "none"
        return Diagnosis(
            False,
            f"upstream refused the identity (403): the token carries roles [{granted}] and scp [{scopes}]; "
            "grant the identity the app role (or scope) the upstream requires",
        )
    if status == 404:
        return Diagnosis(
            False, f"upstream answered 404 for GET {url}: check upstream.url and its base path (e.g. .../api)"
        )
    return Diagnosis(False, f"upstream answered {status} for GET {url}{_error_message(body)}")


def _models(body: bytes) -> str:
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return ""
    return f" ({len(data)} models)" if isinstance(data, list) else ""


def _error_message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {str(message).splitlines()[0][:200]}"


def _tls_hint(error: OSError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
        return "TLS verification failed: set tls.ca_bundle to the CA that signs the upstream's certificate"
    return str(error) or type(error).__name__
