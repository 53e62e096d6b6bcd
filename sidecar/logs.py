"""Logging set-up: text or JSON lines, with a last line of defence that scrubs anything token-shaped."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_ACCESS_FIELDS = (
    "request_id",
    "method",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes_in",
    "bytes_out",
    "upstream_status",
    "backend",
    "apim_request_id",
    "upstream_request_id",
    "region",
)


class Redactor:
    """Replaces JWTs, bearer values and the configured secrets in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        words = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, words))) if words else None

    def __call__(self, text: str) -> str:
        text = _JWT.sub("[redacted-jwt]", text)
        text = _BEARER.sub(r"\1[redacted]", text)
        if self._secrets is not None:
            text = self._secrets.sub("[redacted]", text)
        return text


class RedactingFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self._redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        # the JSON format writes the access fields as they are: a caller's id header could carry a token
        fields = record.__dict__
        for name in _ACCESS_FIELDS:
            value = fields.get(name)
            if isinstance(value, str):
                fields[name] = self._redact(value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(Redactor(secrets)))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The auth libraries log request details at INFO/DEBUG; keep them to warnings.
    for noisy in ("msal", "azure", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
