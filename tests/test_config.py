"""Config errors name the key and the fix, exit 2, one line per problem; env overrides the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import IDENTITY_ENV, run_cli, write_config
from pydantic import BaseModel

from sidecar.config import (
    AUTH_MODELS,
    ConfidentialClientAuth,
    ConfigError,
    DefaultAuth,
    Flow,
    ManagedIdentityAuth,
    OnBehalfOfAuth,
    Settings,
    UserSignInAuth,
    WorkloadIdentityAuth,
    load_config,
)

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


def write(tmp_path: Path, text: str) -> str:
    return write_config(tmp_path / "sidecar.yaml", text)


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
    monkeypatch.setenv("SIDECAR_CONFIG", write(tmp_path, GOOD))
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
        (
            GOOD + "inbound:\n  api_keys_file: /nonexistent/keys\n",
            ["inbound.api_keys_file: cannot read '/nonexistent/keys'", "one inbound key per line"],
        ),
        (
            GOOD + "inbound:\n  api_keys_file: /dev/null\n",
            ["inbound.api_keys_file: '/dev/null' holds no key", "one inbound key per line"],
        ),
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
        "missing-key-file",
        "empty-key-file",
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    joined = "\n".join(caught.value.problems)
    for fragment in expected:
        assert fragment in joined
    assert "hunter2-secret" not in joined


async def test_cli_config_error_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    text = GOOD.replace("  url: https://func.example.net/api\n", "  connect_timeout: 3\n")
    text = text.replace("client_credentials", "bogus")
    code, _, err = await run_cli("check", "--config", write(tmp_path, text))
    assert code == 2
    lines = err.strip().splitlines()
    assert any("upstream.url: missing" in line for line in lines)
    assert any("auth.flow" in line for line in lines)
    assert all(line.startswith("sidecar: config error: ") for line in lines)
    assert "Traceback" not in err


async def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = await run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "cannot read it" in err
    assert "Traceback" not in err


async def test_inbound_key_file_from_env_and_its_errors_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIDECAR_INBOUND__API_KEYS_FILE names the file; at start a file that is missing, empty (blank and comment
    lines only), not text or blank stops the sidecar with exit 2 naming the key and the fix, quoting no key."""
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\n\n  inbound-from-file-1  \ninbound-from-file-2\n")
    settings = Settings(**yaml.safe_load(GOOD), inbound={"api_keys": ["inbound-inline"], "api_keys_file": str(keys)})
    assert {"inbound-from-file-1", "inbound-from-file-2", "inbound-inline"} <= set(settings.secret_values())
    assert "inbound-from-file" not in repr(settings) + str(settings.model_dump())
    config = write(tmp_path, GOOD)
    monkeypatch.setenv("SIDECAR_INBOUND__API_KEYS_FILE", str(keys))
    assert load_config(config).inbound.api_keys_file == keys

    broken = tmp_path / "broken"
    for content, problem in (
        (None, f"cannot read '{broken}' (No such file or directory)"),
        (b"\n  \n# all keys retired\n", f"'{broken}' holds no key"),
        (b"\xffinbound-from-file-3\n", f"'{broken}' is not UTF-8 text"),
    ):
        if content is not None:
            broken.write_bytes(content)
        code, _, err = await run_cli("serve", "--config", config, env={"SIDECAR_INBOUND__API_KEYS_FILE": str(broken)})
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"sidecar: config error: inbound.api_keys_file: {problem}; "), line
        assert "one inbound key per line" in line and "inbound-from-file" not in err
    code, _, err = await run_cli("serve", "--config", config, env={"SIDECAR_INBOUND__API_KEYS_FILE": ""})
    assert code == 2 and "inbound.api_keys_file: is empty: set it to the path of a file" in err, err


def _example_auth_sections(text: str) -> list[dict[str, Any]]:
    """The example's auth section and each commented-out one (a `# auth:` line and the `#   ...` lines under it)."""
    sections = [yaml.safe_load(text)["auth"]]
    lines = text.splitlines()
    for at, line in enumerate(lines):
        if line.startswith("# auth:"):
            block = [line[2:]]
            for following in lines[at + 1 :]:
                if not following.startswith("#   "):
                    break
                block.append(following[2:])
            sections.append(yaml.safe_load("\n".join(block))["auth"])
    return sections


def test_example_config_documents_every_key_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """One file: the shared sections, client_credentials' auth section, and one commented auth section per other
    flow. Every key of every model is in it, each flow's section holds exactly that flow's keys, and each loads."""
    example = Path(__file__).parent.parent / "config.example.yaml"
    text = example.read_text()
    data = yaml.safe_load(text)

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

    sections = _example_auth_sections(text)
    assert sorted(section["flow"] for section in sections) == sorted(flow.value for flow in Flow)
    # what the workload identity webhook would inject: that flow's section leaves its keys to the environment
    monkeypatch.setenv("AZURE_TENANT_ID", "t")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/azure/tokens/azure-identity-token")
    for section in sections:
        flow = Flow(section["flow"])
        model = AUTH_MODELS[flow]
        assert set(section) == set(model.model_fields), f"the example's {flow.value} section: keys differ"
        if issubclass(model, ConfidentialClientAuth):
            section = {**section, "client_secret": "example"}
        settings = Settings(**{**data, "auth": section})
        assert settings.auth.flow is flow
        assert type(settings.auth) is model


def auth_problems(tmp_path: Path, auth: dict[str, Any]) -> list[str]:
    """What load_config says about a file with this auth section."""
    text = yaml.safe_dump({"upstream": {"url": "https://func.example.net"}, "auth": auth})
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


SCOPE = "api://x/.default"
APP = {"scope": SCOPE, "tenant_id": "t", "client_id": "c"}


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"flow": "client_credentials", **APP}, "auth.client_secret: auth.flow=client_credentials needs exactly one"),
        (
            {"flow": "on_behalf_of", **APP, "client_secret": "s", "certificate_path": "/etc/hostname"},
            "(got auth.client_secret and auth.certificate_path)",
        ),
        (
            {"flow": "client_credentials", **APP, "client_secret": "s", "certificate_password": "p"},
            "auth.certificate_password: only used with auth.certificate_path",
        ),
        ({"flow": "on_behalf_of", **APP, "client_secret": "s", "obo_cache_size": 0}, "auth.obo_cache_size:"),
        (
            {"flow": "device_code", "scope": SCOPE, "tenant_id": "t"},
            "auth.client_id: missing; auth.flow=device_code needs it: set it in the config file or "
            "SIDECAR_AUTH__CLIENT_ID in the environment",
        ),
        ({"flow": "interactive", **APP, "tenant_id": " "}, "auth.tenant_id: must not be empty"),
        ({"flow": "interactive", **APP, "authority_host": "http://login.example"}, "auth.authority_host: must be"),
        (
            {"flow": "managed_identity", "scope": SCOPE, "object_id": "o", "resource_id": "r"},
            "auth.resource_id: a user-assigned identity is named by one of auth.client_id, auth.object_id",
        ),
        (
            {"flow": "workload_identity", **APP, "federated_token_file": "/nonexistent/token"},
            "auth.federated_token_file: cannot read '/nonexistent/token'",
        ),
        ({"flow": "azure_cli", "scope": "api://x/.default api://y/.default"}, "auth.scope: must be one scope"),
        ({"flow": "default", "scope": SCOPE, "exclude_credentials": ["magic"]}, "auth.exclude_credentials: unknown"),
        ({"scope": SCOPE}, "auth.flow: missing; set it to one of client_credentials, device_code, interactive"),
    ],
    ids=[
        "client_credentials-no-secret",
        "on_behalf_of-two-secrets",
        "client_credentials-password-without-certificate",
        "on_behalf_of-cache-size",
        "device_code-no-client-id",
        "interactive-blank-tenant",
        "interactive-http-authority",
        "managed_identity-two-ids",
        "workload_identity-unreadable-token-file",
        "azure_cli-two-scopes",
        "default-unknown-credential",
        "no-flow",
    ],
)
def test_each_flow_validates_its_own_keys(tmp_path: Path, auth: dict[str, Any], expected: str) -> None:
    problems = auth_problems(tmp_path, auth)
    assert any(expected in line for line in problems), problems


def test_each_flow_loads_with_only_its_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IDENTITY_ENDPOINT", raising=False)
    secret = {"client_secret": "s"}
    minimal: dict[Flow, dict[str, Any]] = {
        Flow.CLIENT_CREDENTIALS: {**APP, **secret},
        Flow.ON_BEHALF_OF: {**APP, **secret},
        Flow.DEVICE_CODE: APP,
        Flow.INTERACTIVE: APP,
        Flow.MANAGED_IDENTITY: {"scope": SCOPE},
        Flow.WORKLOAD_IDENTITY: {**APP, "federated_token_file": "/etc/hostname"},
        Flow.AZURE_CLI: {"scope": SCOPE},
        Flow.DEFAULT: {"scope": SCOPE},
    }
    for flow, keys in minimal.items():
        auth = Settings(upstream={"url": "https://func.example.net"}, auth={"flow": flow.value, **keys}).auth
        assert type(auth) is AUTH_MODELS[flow]
        assert auth.flow is flow and auth.refresh_margin == 300
    device = Settings(upstream={"url": "https://func.example.net"}, auth={"flow": "device_code", **APP}).auth
    assert isinstance(device, UserSignInAuth)
    assert device.token_cache_path == tmp_path / "cache" / "sidecar" / "msal_token_cache.json"
    interactive = Settings(
        upstream={"url": "https://func.example.net"},
        auth={"flow": "interactive", **APP, "token_cache_path": "~/sidecar-cache.json"},
    ).auth
    assert isinstance(interactive, UserSignInAuth)
    assert interactive.token_cache_path == Path.home() / "sidecar-cache.json"
    obo = Settings(upstream={"url": "https://func.example.net"}, auth={"flow": "on_behalf_of", **APP, **secret}).auth
    assert isinstance(obo, OnBehalfOfAuth) and obo.obo_cache_size == 10_000


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:41234/msi/token"])
def test_managed_identity_records_which_protocol_the_environment_speaks(
    endpoint: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if endpoint:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint)
    else:
        monkeypatch.delenv("IDENTITY_ENDPOINT", raising=False)
    settings = Settings(
        upstream={"url": "https://func.example.net"},
        auth={"flow": "managed_identity", "scope": SCOPE, "resource_id": "/subscriptions/s/id"},
    )
    assert isinstance(settings.auth, ManagedIdentityAuth)
    assert settings.auth.identity_endpoint is bool(endpoint)


@pytest.mark.parametrize(
    ("flow", "key", "value", "used_by"),
    [
        ("client_credentials", "object_id", "o", "managed_identity"),
        ("managed_identity", "client_secret", "s", "client_credentials, on_behalf_of"),
        ("azure_cli", "exclude_credentials", ["azure_cli"], "default"),
        ("device_code", "obo_cache_size", 10, "on_behalf_of"),
    ],
)
def test_a_key_of_another_flow_says_so(tmp_path: Path, flow: str, key: str, value: Any, used_by: str) -> None:
    auth = {"flow": flow, "scope": SCOPE}
    if flow in ("client_credentials", "device_code"):
        auth.update(APP)
    if flow == "client_credentials":
        auth["client_secret"] = "s"
    problems = auth_problems(tmp_path, {**auth, key: value})
    assert problems == [
        f"auth.{key}: not used by auth.flow={flow}; remove it or change auth.flow (it is for {used_by})"
    ]


def test_a_key_of_no_flow_is_unknown_and_null_is_unset(tmp_path: Path) -> None:
    assert auth_problems(tmp_path, {"flow": "azure_cli", "scope": SCOPE, "tenant": "t"}) == [
        "auth.tenant: unknown key; check its spelling against config.example.yaml"
    ]
    # a key written out with no value is the key left out, whichever flow it belongs to
    text = GOOD + "  object_id: null\n  obo_cache_size:\n"
    assert load_config(write(tmp_path, text)).auth.flow is Flow.CLIENT_CREDENTIALS


def test_env_overrides_the_file_inside_a_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "upstream:\n  url: https://func.example.net\nauth:\n  flow: default\n  scope: api://file/.default\n"
    text += "  exclude_credentials: [azure_cli]\n  refresh_margin: 60\n"
    monkeypatch.setenv("SIDECAR_AUTH__EXCLUDE_CREDENTIALS", '["managed_identity", "environment"]')
    monkeypatch.setenv("SIDECAR_AUTH__SCOPE", "api://env/.default")
    settings = load_config(write(tmp_path, text))
    assert isinstance(settings.auth, DefaultAuth)
    assert settings.auth.exclude_credentials == ["managed_identity", "environment"]
    assert settings.auth.scope == "api://env/.default"
    assert settings.auth.refresh_margin == 60  # the file's value where the environment has none
    # an env key of another flow is named like one in the file
    monkeypatch.setenv("SIDECAR_AUTH__OBJECT_ID", "o")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == [
        "auth.object_id: not used by auth.flow=default; remove it or change auth.flow (it is for managed_identity)"
    ]


WORKLOAD = """\
upstream:
  url: https://func.example.net/api
auth:
  flow: workload_identity
  scope: api://demo/.default
"""
WEBHOOK_ENV = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST")


async def test_workload_identity_without_the_webhook_variables_is_a_config_error(tmp_path: Path) -> None:
    # run_cli's environment never has the webhook's variables (harness.IDENTITY_ENV) but those given here
    assert set(WEBHOOK_ENV) <= set(IDENTITY_ENV)
    path = write(tmp_path, WORKLOAD + "  tenant_id: from-the-file\n")
    code, _, err = await run_cli("check", "--config", path, env={"AZURE_CLIENT_ID": "from-env"})
    assert code == 2, err
    [line] = err.strip().splitlines()
    assert line.startswith(
        "sidecar: config error: auth.federated_token_file: missing; auth.flow=workload_identity needs it: "
        "set auth.federated_token_file, or AZURE_FEDERATED_TOKEN_FILE in the environment (the AKS workload "
        "identity webhook injects it when the pod is labelled azure.workload.identity/use=true"
    )
    assert "Traceback" not in err

    code, _, err = await run_cli("check", "--config", write(tmp_path, WORKLOAD))
    assert code == 2
    lines = err.strip().splitlines()
    assert [line.split(":")[2].strip() for line in lines] == [
        "auth.tenant_id",
        "auth.client_id",
        "auth.federated_token_file",
    ]
    for line, variable in zip(lines, WEBHOOK_ENV, strict=False):
        assert f"or {variable} in the environment" in line


def test_workload_identity_takes_what_the_config_lacks_from_the_webhook_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in WEBHOOK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_TENANT_ID", "env-tenant")
    monkeypatch.setenv("AZURE_CLIENT_ID", "env-client")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/azure/tokens/azure-identity-token")
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/")
    auth = load_config(write(tmp_path, WORKLOAD + "  client_id: file-client\n")).auth
    assert isinstance(auth, WorkloadIdentityAuth)
    assert (auth.tenant_id, auth.client_id) == ("env-tenant", "file-client")
    assert auth.federated_token_file == Path("/var/run/secrets/azure/tokens/azure-identity-token")
    assert auth.authority_host == "https://login.microsoftonline.us"
    monkeypatch.delenv("AZURE_AUTHORITY_HOST")
    assert load_config(write(tmp_path, WORKLOAD)).auth.authority_host == "https://login.microsoftonline.com"  # type: ignore[union-attr]


def test_secret_values_lists_every_configured_secret(tmp_path: Path) -> None:
    header_file = tmp_path / "function-key"
    header_file.write_text("from-a-header-file\n")
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("  from-the-secret-file\n")
    shared = {
        "upstream": {
            "url": "https://func.example.net",
            "headers": {"x-functions-key": "inline-header"},
            "headers_files": {"x-other-key": str(header_file)},
        },
        "inbound": {"api_keys": ["inbound-one", "inbound-two"]},
    }
    with_file = Settings(**shared, auth={"flow": "on_behalf_of", **APP, "client_secret_file": str(secret_file)})
    assert sorted(with_file.secret_values()) == sorted(
        ["inbound-one", "inbound-two", "inline-header", "from-a-header-file", "from-the-secret-file"]
    )
    certificate = Settings(
        **shared,
        auth={
            "flow": "client_credentials",
            **APP,
            "certificate_path": "/etc/hostname",
            "certificate_password": "pem-password",
        },
    )
    assert "pem-password" in certificate.secret_values()
    inline = Settings(**shared, auth={"flow": "client_credentials", **APP, "client_secret": "inline-secret"})
    assert "inline-secret" in inline.secret_values()
    managed = Settings(**shared, auth={"flow": "managed_identity", "scope": SCOPE})
    assert sorted(managed.secret_values()) == sorted(
        ["inbound-one", "inbound-two", "inline-header", "from-a-header-file"]
    )
    assert "from-the-secret-file" not in repr(with_file) and "inline-secret" not in repr(inline)


async def test_cleartext_upstream_is_refused_unless_named(tmp_path: Path) -> None:
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
    code, _, err = await run_cli("check", "--config", write(tmp_path, insecure))
    assert code == 2 and "upstream.allow_insecure" in err


def test_log_level_and_format_in_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main refused SIDECAR_LOGGING__LEVEL=debug: only upper case was accepted."""
    monkeypatch.setenv("SIDECAR_LOGGING__LEVEL", "debug")
    monkeypatch.setenv("SIDECAR_LOGGING__FORMAT", "JSON")
    logging_config = load_config(write(tmp_path, GOOD)).logging
    assert (logging_config.level, logging_config.format) == ("DEBUG", "json")
    monkeypatch.setenv("SIDECAR_LOGGING__LEVEL", "chatty")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD))
    assert caught.value.problems[0].startswith("logging.level:")


def test_egress_proxy_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """network.proxy wins over HTTPS_PROXY; NO_PROXY and no_proxy exempt hosts; loopback and IMDS never go
    through a proxy; a proxy's password is a secret for the log redactor."""
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    monkeypatch.setenv("no_proxy", ".internal.example,10.0.0.0/8")
    settings = load_config(write(tmp_path, GOOD))
    network = settings.network
    assert network.proxy_for("https://func.example.net/api") == "http://env-proxy:3128"
    assert network.proxy_for("http://func.example.net/api") is None  # no HTTP_PROXY set
    for direct in ("https://a.internal.example", "https://10.1.2.3", "https://127.0.0.1:8443", "https://localhost",
                   "http://169.254.169.254/metadata/identity/oauth2/token", "https://[::1]:9"):  # fmt: skip
        assert network.proxy_for(direct) is None, direct
    explicit = GOOD + "network:\n  proxy: http://me:s3cr3t-pw@corp-proxy:8080\n  no_proxy: [func.example.net]\n"
    settings = load_config(write(tmp_path, explicit))
    assert settings.network.proxy_for("https://login.microsoftonline.com/t") == "http://me:s3cr3t-pw@corp-proxy:8080"
    assert settings.network.proxy_for("https://func.example.net/api") is None
    assert "s3cr3t-pw" in settings.secret_values()
    assert "s3cr3t-pw" not in repr(settings) and "s3cr3t-pw" not in str(settings.network)


def test_env_lists_must_be_json_and_the_admin_port_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIDECAR_INBOUND__API_KEYS=plainkey was an uncaught traceback; the image's admin port could not be undone."""
    monkeypatch.setenv("SIDECAR_INBOUND__API_KEYS", "plainkey")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, GOOD))
    assert caught.value.problems == [
        'SIDECAR_INBOUND__API_KEYS: must be JSON here, e.g. SIDECAR_INBOUND__API_KEYS=\'["one", "two"]\' (a list) '
        'or \'{"k": "v"}\''
    ]
    monkeypatch.setenv("SIDECAR_INBOUND__API_KEYS", '["plainkey"]')
    for off in ("off", "", "null"):
        monkeypatch.setenv("SIDECAR_ADMIN__PORT", off)
        assert load_config(write(tmp_path, GOOD)).admin.port is None


def test_the_admin_port_cannot_be_the_proxys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One port for both would fail at bind time (or, with SO_REUSEPORT, split callers between them)."""
    for admin_host, listen_host in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "::")):
        monkeypatch.setenv("SIDECAR_ADMIN__HOST", admin_host)
        monkeypatch.setenv("SIDECAR_ADMIN__PORT", "8080")
        monkeypatch.setenv("SIDECAR_LISTEN__HOST", listen_host)
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, GOOD))
        assert caught.value.problems == [
            "admin.port: 8080 is listen.port too; give the admin listener a port of its own (e.g. 9090)"
        ]
    monkeypatch.setenv("SIDECAR_ADMIN__HOST", "127.0.0.2")  # two addresses, one port each: allowed
    monkeypatch.setenv("SIDECAR_LISTEN__HOST", "127.0.0.1")
    assert load_config(write(tmp_path, GOOD)).admin.port == 8080
    monkeypatch.setenv("SIDECAR_ADMIN__PORT", "0")  # port 0: two different ports chosen at bind time
    monkeypatch.setenv("SIDECAR_LISTEN__PORT", "0")
    assert load_config(write(tmp_path, GOOD)).admin.port == 0
