"""Local emulators for offline demos and tests: Entra ID, managed identity, and the secured upstream.

The real msal and azure-identity libraries talk to these over HTTP(S); nothing is monkeypatched.
This is the entra-token-sidecar-emulators distribution (emulators/ in the repository): never installed
with the proxy itself, and never in the production image.
"""

from sidecar_emulators.aadsts import EntraError
from sidecar_emulators.entra import DEFAULT_TENANT_ID, EntraEmulator
from sidecar_emulators.managed_identity import ManagedIdentity, ManagedIdentityEmulator
from sidecar_emulators.stack import DEMO_AUDIENCE, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Stack, start_stack
from sidecar_emulators.tls import TestCA
from sidecar_emulators.upstream import UpstreamEmulator
from sidecar_emulators.upstream_script import RecordedRequest, Scripted

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TENANT_ID",
    "DEMO_AUDIENCE",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "EntraEmulator",
    "EntraError",
    "ManagedIdentity",
    "ManagedIdentityEmulator",
    "RecordedRequest",
    "Scripted",
    "Stack",
    "TestCA",
    "UpstreamEmulator",
    "start_stack",
]
