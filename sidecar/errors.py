"""The JSON errors the sidecar itself answers with, in the Azure OpenAI shape the SDKs display."""

from __future__ import annotations

import json
import logging
import math

from aiohttp import web

from sidecar.backends import AllCooling
from sidecar.tokens.base import IdentityError
from sidecar.upstream import ConnectError, ConnectTimeout, OffOrigin, ReadTimeout, Unsendable, UpstreamError


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retryable: bool = True,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    response = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )
    # The openai SDK honours this header: no point retrying a wrong secret or a bad config.
    response.headers["x-should-retry"] = "true" if retryable else "false"
    return response


def identity_error_response(error: IdentityError) -> web.Response:
    code = error.code or ("UserTokenRejected" if error.status == 401 else "TokenUnavailable")
    prefix = "" if error.status == 401 else "sidecar could not get a token for the upstream: "
    return error_response(error.status, code, prefix + error.one_line(), retryable=error.retryable)


def upstream_error_response(exc: UpstreamError) -> web.Response:
    """The JSON answer for an upstream that could not be reached or answered nothing usable."""
    if isinstance(exc, AllCooling):
        wait_ms = max(1, math.ceil(exc.wait * 1000))
        return error_response(
            429,
            "AllBackendsCooling",
            f"every backend of this route is throttled or unreachable; retry after {wait_ms} ms",
            headers={"retry-after": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)},
        )
    if isinstance(exc, Unsendable):
        if isinstance(exc, OffOrigin):  # the gate should have refused it: worth a line for whoever maintains it
            logging.getLogger("sidecar.proxy").warning("refused to send a request off the upstream's origin")
        return error_response(400, "InvalidRequest", str(exc), retryable=False)
    if isinstance(exc, ConnectError):
        return error_response(502, "UpstreamUnreachable", f"cannot connect to the upstream: {exc.os_error}")
    if isinstance(exc, ConnectTimeout):
        return error_response(502, "UpstreamUnreachable", "connecting to the upstream timed out")
    if isinstance(exc, ReadTimeout):
        return error_response(504, "UpstreamTimeout", "the upstream sent no response within upstream.read_timeout")
    return error_response(502, "UpstreamError", f"the upstream connection failed: {exc}")
