"""The log set-up (sidecar/logs.py) as `serve` configures it: text or JSON lines, and the redactor that scrubs every
JWT, every bearer value and every configured secret from a record's message, its arguments and its exception,
whatever a caller (ours or a library's) logged."""

from __future__ import annotations

import json
import logging
import re

import jwt
import pytest
from harness import configured_logging

SECRET = "client-secret-value-from-the-config"
OPAQUE = "opaque-access-token-0123456789"  # a bearer value that is no JWT (a managed identity's, an api key)
TOKEN = jwt.encode({"aud": "api://upstream", "oid": "0000-1111"}, "signing-key-of-32-bytes-or-more!", "HS256")

log = logging.getLogger("sidecar.test_logs")


def log_everywhere() -> None:
    """A JWT, a bearer value and the secret in each part of a record: the message, the arguments, the exception."""
    log.info(f"in the message: {TOKEN} Authorization: Bearer {OPAQUE} and {SECRET}")
    log.warning("in the arguments: %s %s", TOKEN, {"client_secret": SECRET, "header": f"Bearer {OPAQUE}"})
    try:
        raise ValueError(f"the identity provider said {TOKEN} about {SECRET}")
    except ValueError:
        log.exception("in the exception")


def assert_scrubbed(text: str) -> None:
    for leaked in (TOKEN, SECRET, OPAQUE, TOKEN.split(".")[1]):
        assert leaked not in text
    assert "eyJ" not in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tokens_and_secrets_never_reach_the_log(fmt: str) -> None:
    with configured_logging(fmt, secrets=[SECRET, "abc"]) as out:
        log_everywhere()
    text = out.getvalue()
    assert_scrubbed(text)
    # what surrounds them is kept: the line still says what happened
    for kept in (
        "in the message: [redacted-jwt] Authorization: Bearer [redacted] and [redacted]",
        "in the arguments: [redacted-jwt] {'client_secret': '[redacted]', 'header': 'Bearer [redacted]'}",
        "in the exception",
        "ValueError: the identity provider said [redacted-jwt] about [redacted]",
    ):
        assert kept in text, (kept, text)


def test_text_lines() -> None:
    with configured_logging("text") as out:
        log.info("one line")
        logging.getLogger("msal").info("a library's detail")  # msal, azure, urllib3: warnings only
        logging.getLogger("azure.identity").warning("a library's warning")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" INFO    sidecar\.test_logs: one line", lines[0]), lines[0]
    assert re.fullmatch(stamp + r" WARNING azure\.identity: a library's warning", lines[1]), lines[1]


def test_json_lines() -> None:
    with configured_logging("json", secrets=[SECRET]) as out:
        log_everywhere()
        logging.getLogger("msal").info("a library's detail")
    entries = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is one JSON object
    assert [(e["level"], e["logger"]) for e in entries] == [
        ("info", "sidecar.test_logs"),
        ("warning", "sidecar.test_logs"),
        ("error", "sidecar.test_logs"),
    ]
    for entry in entries:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry["time"]
    failed = entries[2]
    assert failed["message"] == "in the exception"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ValueError: the identity provider said [redacted-jwt] about [redacted]")
    assert "exception" not in entries[0]
