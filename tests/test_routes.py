"""Route families (sidecar/routes.py): the bounded names metrics and the access log use instead of raw paths, which
hold deployment names, ids and whatever else a caller puts there."""

from __future__ import annotations

import pytest

from sidecar.routes import route_family


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/openai/deployments/gpt-4o-mini/chat/completions", "chat.completions"),
        ("/openai/deployments/my-gpt/completions", "completions"),
        ("/openai/deployments/text-embedding-3-small/embeddings", "embeddings"),
        ("/openai/deployments/whisper/audio/transcriptions", "audio.transcriptions"),
        ("/openai/deployments/whisper/audio/translations", "audio.translations"),
        ("/openai/deployments/tts/audio/speech", "audio.speech"),
        ("/openai/deployments/dall-e-3/images/generations", "images.generations"),
        ("/openai/models", "models"),
        ("/openai/files/file-abc123/content", "files"),
        ("/openai/batches/batch_abc123", "batches"),
        ("/openai/assistants/asst_abc", "assistants"),
        ("/openai/threads/thread_abc/runs/run_abc", "threads"),
        ("/openai/vector_stores/vs_abc", "vector_stores"),
        ("/openai/realtime", "realtime"),
        ("/openai/responses", "responses"),
        ("/openai/fine_tuning/jobs", "fine_tuning"),
        # the v1 API: no deployment in the path
        ("/openai/v1/chat/completions", "chat.completions"),
        ("/openai/v1/embeddings", "embeddings"),
        # the deployment name is the caller's choice: one named like a family does not decide the family
        ("/openai/deployments/embeddings/chat/completions", "chat.completions"),
        ("/openai/deployments/models/audio/speech", "audio.speech"),
        # a family name inside a longer segment is not that family
        ("/openai/deployments/x/chat/completionsx", "other"),
        ("/openai/deployments/x/something-new", "other"),
        ("/openai/", "other"),
        # the sidecar's own routes, and everything it does not serve
        ("/healthz", "sidecar"),
        ("/readyz", "sidecar"),
        ("/metrics", "sidecar"),
        ("/", "not_found"),
        ("/openaix/models", "not_found"),
        ("/v1/chat/completions", "not_found"),
    ],
)
def test_route_family(path: str, family: str) -> None:
    assert route_family(path) == family
