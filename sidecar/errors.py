"""The JSON errors the sidecar itself answers with, in the Azure OpenAI shape the SDKs display."""

from __future__ import annotations

import json

from aiohttp import web

from sidecar.tokens.base import IdentityError


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
