"""Liveness is not readiness: a service whose broker is unreachable is not ready (nothing to
consume) but alive, since a restart would not bring the broker back (the Kubernetes probes ask
for these two health names; tests/deploy checks they do)."""

from __future__ import annotations

from prolifscore.core.runtime.service import LIVENESS, ServiceRuntime
from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.localstack.stack import check_health


def test_broker_loss_fails_readiness_not_liveness():
    runtime = ServiceRuntime("tiling", load(RuntimeSettings, environ={})).start()
    address = f"127.0.0.1:{runtime.port}"
    try:
        assert check_health(address, service=LIVENESS) == "SERVING"  # from the start
        runtime.set_serving(True)
        runtime.set_broker_up(True)
        assert check_health(address) == check_health(address, service="tiling") == "SERVING"
        runtime.set_broker_up(False)
        assert check_health(address) == check_health(address, service="tiling") == "NOT_SERVING"
        assert check_health(address, service=LIVENESS) == "SERVING"
    finally:
        runtime.stop()
