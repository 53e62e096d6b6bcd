"""Bounded names for request paths, so metrics and logs never carry raw paths (which hold deployment names)."""

from __future__ import annotations

import re

_FAMILIES = (
    ("chat/completions", "chat.completions"),
    ("embeddings", "embeddings"),
    ("audio/transcriptions", "audio.transcriptions"),
    ("audio/translations", "audio.translations"),
    ("audio/speech", "audio.speech"),
    ("images/generations", "images.generations"),
    ("images/edits", "images.edits"),
    ("completions", "completions"),
    ("responses", "responses"),
    ("models", "models"),
    ("files", "files"),
    ("batches", "batches"),
    ("fine_tuning", "fine_tuning"),
    ("assistants", "assistants"),
    ("threads", "threads"),
    ("vector_stores", "vector_stores"),
    ("realtime", "realtime"),
)
_PATTERN = re.compile("|".join(f"(?P<g{i}>/{re.escape(part)}(?:/|$))" for i, (part, _) in enumerate(_FAMILIES)))
_PREFIX = re.compile(r"^/openai(?:/deployments/[^/]+|/v1)?")
_NAMES = {f"g{i}": name for i, (_, name) in enumerate(_FAMILIES)}


def route_family(path: str) -> str:
    """`/openai/deployments/x/chat/completions` -> `chat.completions`; anything unknown -> `other`."""
    if not path.startswith("/openai/"):
        return "sidecar" if path in ("/healthz", "/readyz", "/metrics") else "not_found"
    # the deployment name is the caller's choice ("embeddings" is a valid one): look past it
    match = _PATTERN.search(_PREFIX.sub("", path))
    return _NAMES[match.lastgroup] if match and match.lastgroup else "other"
