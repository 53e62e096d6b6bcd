"""Config errors name the key and the fix, exit 2, one line per problem; env overrides the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Flow, load_config

GOOD = """\
upstream:
  url: https://func.example.net/api
auth:
  flow: client_credentials
  scope: api://demo/.default
  tenant_id: t
  client_id: c
  client_secret: hunter2-secret
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)


def test_defaults_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("SIDECAR_LISTEN__PORT", "9999")
    monkeypatch.setenv("SIDECAR_AUTH__CLIENT_ID", "from-env")
    settings = load_config(path)
    assert settings.listen.host == "127.0.0.1"
    assert settings.listen.port == 9999
    assert settings.auth.client_id == "from-env"
    assert settings.auth.flow is Flow.CLIENT_CREDENTIALS
    assert settings.upstream.read_timeout == 300
    assert settings.auth.audience == "api://demo"
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings.model_dump())


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_CONFIG", str(write(tmp_path, GOOD)))
    assert load_config().upstream.url == "https://func.example.net/api"


def test_everything_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_UPSTREAM__URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SIDECAR_AUTH__FLOW", "managed_identity")
    monkeypatch.setenv("SIDECAR_AUTH__SCOPE", "api://x/.default")
    monkeypatch.setenv("SIDECAR_INBOUND__API_KEYS", '["k1", "k2"]')
    settings = load_config()
    assert settings.auth.flow is Flow.MANAGED_IDENTITY
    assert [k.get_secret_value() for k in settings.inbound.api_keys] == ["k1", "k2"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("  url: https://func.example.net/api\n", "  connect_timeout: 3\n"), ["upstream.url: missing"]),
        (GOOD.replace("client_credentials", "magic"), ["auth.flow:", "client_credentials"]),
        (GOOD + "  client_secret_file: /etc/hostname\n", ["auth.client_secret", "exactly one of"]),
        (
            GOOD.replace("client_secret: hunter2-secret", "client_secret_file: /nonexistent/secret"),
            ["auth.client_secret_file: cannot read '/nonexistent/secret'"],
        ),
        ("upstream: [unclosed\n", ["not valid YAML at line"]),
        (GOOD.replace("upstream:", "upstreem:"), ["upstreem: unknown key"]),
        (GOOD.replace("scope: api://demo/.default", "scope: ''"), ["auth.scope"]),
        (GOOD.replace("https://func.example.net/api", "ftp://x"), ["upstream.url: must be an http(s) URL"]),
    ],
    ids=[
        "missing-url",
        "unknown-flow",
        "two-secrets",
        "unreadable-secret-file",
        "bad-yaml",
        "typo",
        "empty-scope",
        "bad-url",
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    joined = "\n".join(caught.value.problems)
    for fragment in expected:
        assert fragment in joined
    assert "hunter2-secret" not in joined


def test_cli_config_error_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    text = GOOD.replace("  url: https://func.example.net/api\n", "  connect_timeout: 3\n")
    text = text.replace("client_credentials", "bogus")
    result = run_cli("check", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("upstream.url: missing" in line for line in lines)
    assert any("auth.flow" in line for line in lines)
    assert all(line.startswith("sidecar: config error: ") for line in lines)
    assert "Traceback" not in result.stderr


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read it" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_config_documents_every_key_and_loads() -> None:
    import yaml
    from pydantic import BaseModel

    from sidecar.config import Settings

    example = Path(__file__).parent.parent / "config.example.yaml"
    data = yaml.safe_load(example.read_text())

    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += keys(annotation, f"{prefix}{name}.")
            else:
                found.append(prefix + name)
        return found

    for key in keys(Settings):
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"config.example.yaml does not document {key}"
            node = node[part]
    data["auth"]["client_secret"] = "example"
    assert Settings(**data).auth.flow is Flow.CLIENT_CREDENTIALS


def test_cleartext_upstream_is_refused_unless_named(tmp_path: Path) -> None:
    """main accepted http:// to any host silently: the token would cross the network in cleartext."""
    insecure = GOOD.replace("https://func.example.net/api", "http://func.example.net/api")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, insecure))
    (line,) = caught.value.problems
    assert line.startswith("upstream.url: http:// to func.example.net")
    assert "https://" in line and "upstream.allow_insecure: true" in line
    allowed = insecure.replace(
        "  url: http://func.example.net/api\n", "  url: http://func.example.net/api\n  allow_insecure: true\n"
    )
    assert load_config(write(tmp_path, allowed)).upstream.allow_insecure is True
    for loopback in ("http://127.0.0.1:8081/api", "http://localhost:8081", "http://[::1]:8081"):
        assert load_config(write(tmp_path, GOOD.replace("https://func.example.net/api", loopback))).upstream.url
    result = run_cli("check", "--config", str(write(tmp_path, insecure)))
    assert result.returncode == 2 and "upstream.allow_insecure" in result.stderr
