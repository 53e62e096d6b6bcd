"""The compose stack's example app: an ordinary openai-SDK program that talks to Azure OpenAI through the
sidecar. It holds no Entra ID credential; the sidecar attaches the bearer token.

Prints a streamed chat answer and exits 0; exits 1 with one line on stderr if the call fails.
Settings (all optional): AZURE_OPENAI_ENDPOINT (http://sidecar:8080), AZURE_OPENAI_DEPLOYMENT
(gpt-4o-mini), OPENAI_API_VERSION (2024-06-01), EXAMPLE_PROMPT.
"""

from __future__ import annotations

import os
import sys

from openai import AzureOpenAI, OpenAIError


def main() -> int:
    endpoint = os.environ.get("AZURE_OPENAI_ENDPOINT", "http://sidecar:8080")
    deployment = os.environ.get("AZURE_OPENAI_DEPLOYMENT", "gpt-4o-mini")
    client = AzureOpenAI(
        azure_endpoint=endpoint,
        api_key="unused",  # the sidecar authenticates upstream; this key never leaves the pod/host
        api_version=os.environ.get("OPENAI_API_VERSION", "2024-06-01"),
        max_retries=2,
        timeout=60,
    )
    prompt = os.environ.get("EXAMPLE_PROMPT", "In one sentence: what does a sidecar proxy do?")
    print(f"example-app: asking {deployment!r} through {endpoint}", file=sys.stderr, flush=True)
    chunks = 0
    try:
        stream = client.chat.completions.create(
            model=deployment,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
        )
        for chunk in stream:
            for choice in chunk.choices:
                text = choice.delta.content if choice.delta else None
                if text:
                    chunks += 1
                    print(text, end="", flush=True)
    except OpenAIError as exc:
        print(f"\nexample-app: the request through the sidecar failed: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(flush=True)
    if chunks == 0:
        print("example-app: the stream carried no text", file=sys.stderr)
        return 1
    print(f"example-app: ok, {chunks} streamed chunks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
