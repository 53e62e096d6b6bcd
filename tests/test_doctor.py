"""`sidecar check --upstream` and the start-up check: one request to the upstream, one line naming the cause."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from harness import StartSidecar, config_for, free_port, merge, run_cli, write_config

from sidecar_emulators import Scripted, Stack


async def check_upstream(tmp_path: Path, config: dict) -> tuple[int, str]:
    code, out, err = await run_cli("check", "--upstream", "--config", write_config(tmp_path / "sidecar.yaml", config))
    assert "Traceback" not in err
    return code, out.strip().splitlines()[-1]


async def test_check_upstream_names_the_cause_of_each_outcome(stack: Stack, tmp_path: Path) -> None:
    code, line = await check_upstream(tmp_path, config_for(stack))
    assert (
        code == 0
        and line
        == f"upstream ok: GET {stack.upstream_url}/openai/models?api-version=2024-10-21 answered 200 (3 models)"
    )

    stack.entra.register_resource("api://some-other-api")  # a token the upstream does not accept
    code, line = await check_upstream(tmp_path, config_for(stack, auth={"scope": "api://some-other-api/.default"}))
    assert code == 1
    assert line.startswith("upstream rejected the token (401): it was issued for audience 'api://some-other-api'")

    stack.upstream.script(Scripted(status=403, match="/openai/models"))
    code, line = await check_upstream(tmp_path, config_for(stack))
    assert code == 1 and line.startswith("upstream refused the identity (403): the token carries roles [")

    wrong_base = stack.upstream_url.rsplit("/api", 1)[0] + "/wrong"
    code, line = await check_upstream(tmp_path, config_for(stack, upstream={"url": wrong_base}))
    assert code == 1 and line.startswith("upstream answered 404 for GET ") and "base path" in line

    closed = f"http://127.0.0.1:{free_port()}"
    code, line = await check_upstream(tmp_path, config_for(stack, upstream={"url": closed}))
    assert code == 1 and line.startswith("upstream unreachable: cannot connect to 127.0.0.1")


async def test_serve_says_at_start_up_what_the_upstream_answered(
    stack: Stack, run_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    stack.entra.register_resource("api://some-other-api")
    config = merge(config_for(stack, auth={"scope": "api://some-other-api/.default"}), {"upstream": {"probe": True}})
    await run_sidecar(config)
    for _ in range(200):
        lines = [r for r in caplog.records if r.getMessage().startswith("start-up check: ")]
        if lines:
            break
        await asyncio.sleep(0.05)
    (record,) = lines
    assert record.levelno == logging.WARNING
    assert "upstream rejected the token (401)" in record.getMessage()
    assert [seen.path_qs for seen in stack.upstream.requests] == ["/api/openai/models?api-version=2024-10-21"]
