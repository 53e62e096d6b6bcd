"""Response bodies shaped like Azure OpenAI's, parseable by the ``openai`` Python SDK."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

_DEFAULT_EMBEDDING_DIMENSIONS = 8


def _count_tokens(value: Any) -> int:
    # A stand-in tokenizer: whitespace words, at least 1 per item.
    return max(1, len(json.dumps(value).split()))


def _prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 1
    return sum(_count_tokens(m.get("content", "")) if isinstance(m, dict) else 1 for m in messages)


def chat_completion(model: str, content: str, request_body: Mapping[str, Any]) -> dict[str, Any]:
    prompt_tokens = _prompt_tokens(request_body.get("messages"))
    completion_tokens = _count_tokens(content)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_emulator",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def split_content(content: str, pieces: int) -> list[str]:
    """Split into ``pieces`` non-empty-ish parts whose concatenation is ``content``."""
    pieces = max(1, pieces)
    size = -(-len(content) // pieces) if content else 0
    parts = [content[i * size : (i + 1) * size] for i in range(pieces)]
    return parts


def chat_completion_chunks(
    model: str, content: str, chunks: int, request_body: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """``chunks`` chat.completion.chunk objects; the last carries finish_reason (and usage if asked)."""
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    parts = split_content(content, chunks)
    events: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        delta: dict[str, Any] = {"content": part}
        if index == 0:
            delta["role"] = "assistant"
        last = index == len(parts) - 1
        events.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_emulator",
                "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None, "logprobs": None}],
            }
        )
    stream_options = request_body.get("stream_options")
    if isinstance(stream_options, dict) and stream_options.get("include_usage"):
        prompt_tokens = _prompt_tokens(request_body.get("messages"))
        completion_tokens = _count_tokens(content)
        events.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )
    return events


def sse_event(data: str | bytes | Mapping[str, Any]) -> bytes:
    """One server-sent event; bytes are taken as an already-framed event."""
    if isinstance(data, bytes):
        return data
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def _vector(item: Any, dimensions: int) -> list[float]:
    seed = hashlib.sha256(json.dumps(item).encode()).digest()
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values.extend((b / 127.5) - 1.0 for b in block)
        counter += 1
    return values[:dimensions]


def embeddings(model: str, request_body: Mapping[str, Any]) -> dict[str, Any]:
    raw_input = request_body.get("input", "")
    # A list of strings or of token lists is a batch; a flat list of ints is one tokenized input.
    items: Sequence[Any]
    if isinstance(raw_input, list) and raw_input and not isinstance(raw_input[0], int):
        items = raw_input
    else:
        items = [raw_input]
    dimensions = int(request_body.get("dimensions") or _DEFAULT_EMBEDDING_DIMENSIONS)
    as_base64 = request_body.get("encoding_format") == "base64"  # the openai SDK's default
    data = []
    for index, item in enumerate(items):
        vector = _vector(item, dimensions)
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(_count_tokens(i) for i in items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models(names: Sequence[str]) -> dict[str, Any]:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "system"} for name in names],
    }


def not_found() -> dict[str, Any]:
    return {"error": {"code": "404", "message": "Resource not found"}}
