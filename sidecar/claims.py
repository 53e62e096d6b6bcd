"""Reading a JWT's claims without verifying it: for messages and `sidecar check`, never for trust."""

from __future__ import annotations

import base64
import json
import time
from typing import Any


def unverified_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        padded = payload + "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


_SHOWN = ("aud", "iss", "tid", "appid", "azp", "oid", "name", "preferred_username", "roles", "scp", "idtyp")


def describe(token: str, now: float | None = None) -> list[tuple[str, str]]:
    """The non-secret claims worth showing an operator, as (name, value) rows, expiry last."""
    claims = unverified_claims(token)
    rows: list[tuple[str, str]] = []
    for name in _SHOWN:
        value = claims.get(name)
        if value is None:
            continue
        rows.append((name, ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        left = exp - (time.time() if now is None else now)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
        rows.append(("exp", f"{when} (expires in {max(0, int(left // 60))} min)"))
    return rows
