"""What a production install gets: the proxy's distribution declares exactly what sidecar/ imports (and
nothing the emulators or the demo need), the lock the image installs pins all of it (the `otel` extra
included) with hashes, the version is written once, and aiohttp is held to the minor release whose
internals the proxy uses.

The installing itself (a fresh venv, the image) is checked by scripts/container-test.sh and by hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import sidecar

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EMULATORS = tomllib.loads((ROOT / "emulators" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EMULATOR_ONLY = {"openai", "trustme"}


def declared(project: dict[str, object]) -> dict[str, Requirement]:
    requirements = [Requirement(text) for text in project["dependencies"]]  # type: ignore[attr-defined]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def imported_modules(package: Path) -> set[str]:
    """Every absolute module name imported anywhere in the package (or the one file), functions included."""
    names: set[str] = set()
    for path in package.rglob("*.py") if package.is_dir() else [package]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def distribution_of(module: str) -> str:
    """The installed distribution that provides `module` (namespace packages such as azure.* included)."""
    top = module.partition(".")[0]
    candidates = importlib.metadata.packages_distributions().get(top, [])
    if len(set(candidates)) == 1:
        return canonicalize_name(candidates[0])
    prefix = "/".join(module.split(".")[:2]) + "/"
    for name in candidates:
        if any(str(file).startswith(prefix) for file in importlib.metadata.distribution(name).files or []):
            return canonicalize_name(name)
    raise AssertionError(f"no installed distribution provides {module} (candidates: {candidates})")


def third_party(modules: set[str], own: set[str]) -> set[str]:
    return {m for m in modules if m.partition(".")[0] not in sys.stdlib_module_names | own}


def test_the_proxy_declares_exactly_the_third_party_packages_it_imports() -> None:
    # sidecar_emulators: only `sidecar demo` imports it, and says how to get it when it is absent (test_cli.py).
    own = {"sidecar", "sidecar_emulators", "__future__"}
    modules = third_party(imported_modules(ROOT / "sidecar"), own)
    used = {distribution_of(module) for module in modules}
    # The `otel` extra: sidecar/telemetry.py alone imports it, and app.py loads that module only with tracing on
    # (test_telemetry.py checks that nothing of it is loaded otherwise).
    otel = set(declared({"dependencies": RUNTIME["optional-dependencies"]["otel"]}))
    elsewhere = {
        distribution_of(module)
        for path in (ROOT / "sidecar").rglob("*.py")
        if path.name != "telemetry.py"
        for module in third_party(imported_modules(path), own)
    }
    assert not otel & elsewhere, "only sidecar/telemetry.py imports the otel extra"
    # PyJWT is declared without an import of ours yet: msal signs client assertions with it, and caller-token
    # validation (on-behalf-of) is to use it.
    assert used | {"pyjwt"} == set(declared(RUNTIME)) | otel, "sidecar/ imports what pyproject.toml declares, no more"
    assert not EMULATOR_ONLY & set(declared(RUNTIME))


def test_the_emulators_declare_what_they_import_plus_the_proxy() -> None:
    package = ROOT / "emulators" / "sidecar_emulators"
    modules = third_party(imported_modules(package), {"sidecar", "sidecar_emulators", "__future__"})
    needs = declared(EMULATORS)
    assert {distribution_of(module) for module in modules} <= set(needs)
    assert EMULATOR_ONLY <= set(needs)
    assert "entra-token-sidecar" in needs  # the demo runs the proxy itself


def test_the_distribution_is_not_named_like_the_unrelated_sidecar_project() -> None:
    assert RUNTIME["name"] == "entra-token-sidecar"
    assert EMULATORS["name"] == "entra-token-sidecar-emulators"
    assert RUNTIME["scripts"] == {"sidecar": "sidecar.cli:main"}


def test_the_version_is_written_once() -> None:
    assert "version" not in RUNTIME and RUNTIME["dynamic"] == ["version"]
    assert importlib.metadata.version("entra-token-sidecar") == sidecar.__version__
    # the image label takes it as a build argument, never as a literal
    assert sidecar.__version__ not in (ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_aiohttp_is_held_to_the_minor_release_the_suite_runs_on() -> None:
    installed = Version(importlib.metadata.version("aiohttp"))
    pin = declared(RUNTIME)["aiohttp"].specifier
    assert installed in pin
    # server.py, proxy.py and app.py use aiohttp internals: the next minor release is not allowed in
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in pin
    assert declared(EMULATORS)["aiohttp"].specifier == pin


def locked(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) of a pip-compile --generate-hashes output."""
    pins: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=\S)", path.read_text(encoding="utf-8")):
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if match:
            pins[canonicalize_name(match[1])] = (Version(match[2]), block.count("--hash=sha256:"))
    return pins


@pytest.mark.parametrize("lock", ["requirements.lock", "emulators/requirements.lock"])
def test_the_locks_pin_every_dependency_with_hashes(lock: str) -> None:
    pins = locked(ROOT / lock)
    # the `otel` extra too: the production image traces when an operator sets OTEL_EXPORTER_OTLP_ENDPOINT
    otel = declared({"dependencies": RUNTIME["optional-dependencies"]["otel"]})
    needs = declared(RUNTIME) | otel | (declared(EMULATORS) if lock.startswith("emulators") else {})
    needs.pop("entra-token-sidecar", None)  # installed from the checkout with --no-deps
    for name, requirement in needs.items():
        assert name in pins, f"{lock} lacks {name}: run `make lock`"
        version, _ = pins[name]
        assert version in requirement.specifier, f"{lock}: {name}=={version} does not meet {requirement}: `make lock`"
    assert all(hashes for _, hashes in pins.values()), "every pin carries its hashes"
    if lock == "requirements.lock":
        assert not EMULATOR_ONLY & set(pins), "the production image never gets the emulators' dependencies"


def test_the_emulators_lock_agrees_with_the_proxys() -> None:
    runtime, dev = locked(ROOT / "requirements.lock"), locked(ROOT / "emulators" / "requirements.lock")
    assert {name: dev.get(name) for name in runtime} == runtime


@pytest.mark.parametrize("package", ["sidecar", "emulators/sidecar_emulators"])
def test_no_module_is_over_400_lines(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long
