"""device_code: a person signs in once with a code shown in the log; `serve` then renews from the saved
sign-in. With no saved sign-in (or an expired one) `serve` starts a device flow itself and prints the code."""

from __future__ import annotations

from sidecar.config import DeviceCodeAuth, Settings
from sidecar.tokens._signin import Answer, SignInProvider
from sidecar.tokens.base import TokenProvider


class DeviceCodeProvider(SignInProvider):
    flow = "device_code"
    pending_message = "waiting for a user to sign in: the device code is in the sidecar's log (stderr)"

    def _acquire(self) -> Answer:
        return self._client.silent() or self._client.device_flow()


def build(settings: Settings) -> TokenProvider:
    assert isinstance(settings.auth, DeviceCodeAuth)
    return DeviceCodeProvider(settings.auth, settings.tls, settings.network)
