"""What tokens/base.py declares for every flow: AccessToken never shows the token it holds."""

from __future__ import annotations


def test_access_token_repr_hides_the_token() -> None:
    from sidecar.tokens.base import AccessToken

    token = AccessToken("eyJhbGciOiJSUzI1NiJ9.secret-part.sig", 123.0)
    assert "secret-part" not in repr(token)
    assert "secret-part" not in str(token)
