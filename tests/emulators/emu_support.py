"""Constants and helpers shared by the emulator tests (imported by name: tests/ is not a package)."""

from __future__ import annotations

from typing import Any

import jwt

from sidecar_emulators import EntraEmulator

DEMO_API = "api://sidecar-demo-api"
DEMO_SCOPE = f"{DEMO_API}/.default"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "correct-horse-battery-staple"


def verify(entra: EntraEmulator, token: str, audience: str) -> dict[str, Any]:
    """Verify a token the way a resource server would, with the emulator's published key."""
    key = entra.public_keys[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=entra.issuer)
