"""The partner library is a library: importing it brings none of the service along."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import prometheus_client
before = set(prometheus_client.REGISTRY._names_to_collectors)
import receiver.partner
after = set(prometheus_client.REGISTRY._names_to_collectors)
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.startswith("receiver")),
    "registered": sorted(after - before),
}))
"""

# What a partner application may load: the library itself and the layers under it.
_ALLOWED = {
    "receiver",
    "receiver.config",
    "receiver.endpoints",
    "receiver.db",
    "receiver.errors",
    "receiver.partner",
    "receiver.partner.blocking",
    "receiver.partner.cache",
    "receiver.partner.calling",
    "receiver.partner.expiring",
    "receiver.partner.failures",
    "receiver.partner.minted",
    "receiver.partner.refreshing",
    "receiver.partner.transport",
    "receiver.signing",
    "receiver.vault",
}


def test_importing_the_partner_library_loads_no_service_module_and_registers_nothing() -> None:
    """`import receiver.partner` in a fresh interpreter loads only the library and the
    layers under it, and adds no collector to the application's Prometheus registry."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    seen = json.loads(out)
    assert "receiver.partner" in seen["modules"]
    assert set(seen["modules"]) <= _ALLOWED, set(seen["modules"]) - _ALLOWED
    assert seen["registered"] == []


def test_the_service_does_register_its_metrics() -> None:
    """The probe above can see a registration: importing the service's metrics adds
    `receiver_*` collectors to the default registry."""
    probe = _PROBE.replace("import receiver.partner", "import receiver.metrics")
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert any(name.startswith("receiver_") for name in json.loads(out)["registered"])
