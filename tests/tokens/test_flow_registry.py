"""The registry maps every flow to its module by plain imports, and importing all of them stays light: a flow's
heavy library (azure-identity, PyJWT with cryptography) is loaded only when that flow is built."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sidecar.tokens
from sidecar.config import AUTH_MODELS, Flow
from sidecar.tokens import AUTHORIZERS, PROVIDERS

TOKENS = Path(sidecar.tokens.__file__).parent


def test_every_flow_has_one_factory_and_one_config_model() -> None:
    assert set(PROVIDERS) | set(AUTHORIZERS) == set(Flow)
    assert not set(PROVIDERS) & set(AUTHORIZERS)
    assert set(AUTH_MODELS) == set(Flow)
    for flow in Flow:
        factory = PROVIDERS.get(flow) or AUTHORIZERS[flow]
        assert factory.__module__ == f"sidecar.tokens.{flow.value}", "one module per flow, named after it"


def test_flow_modules_import_no_other_flow() -> None:
    flows = {flow.value for flow in Flow}
    for flow in flows:
        tree = ast.parse((TOKENS / f"{flow}.py").read_text())
        imported = {
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            for name in (node.module, *(f"{node.module}.{alias.name}" for alias in node.names))
        }
        others = {f"sidecar.tokens.{other}" for other in flows - {flow}}
        assert not imported & others, f"{flow} imports another flow's module"


def test_importing_every_flow_loads_no_heavy_library() -> None:
    code = (
        "import sys, sidecar.app, sidecar.cli, sidecar.tokens; "
        "print(sorted(m for m in ('azure.identity', 'azure.core', 'cryptography', 'jwt') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
