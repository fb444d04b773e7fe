"""Ray start-up for a service: join the configured cluster, or start a local one bound to
loopback."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Must be in the environment before `import ray` (Ray reads them at import time). Token auth
# stays on: a joining process reads the token from ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    # Ray starts its workers at nice 15 (RayConfig worker_niceness), which suits helper tasks
    # beside a busy driver; ours do the work (Ray Train's training loop, slide readers), and at
    # nice 15 any normal-priority process on the machine starves them. On the shared 2-core
    # machine the tumor model once trained at 5.8 img/s under Ray; the same ResNet50 fit (64 px,
    # batch 32) ran at 12.4 img/s at nice 15 and 27.2 at nice 0 at a load average of 8-9, at
    # 32 images per CPU-second either way. Applies to the Ray this process or `RayHead` starts,
    # not to a cluster it joins.
    "RAY_worker_niceness": "0",
}
for _var, _value in LOOPBACK_ENV.items():  # at import, so no earlier `import ray` can miss them
    os.environ.setdefault(_var, _value)


def init_ray(address: str = "", num_cpus: int = 0) -> None:
    """Idempotent. Locally, Ray would bind the machine's non-loopback address; the variable set
    here (before Ray starts) keeps every Ray listener on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address:
        log.info("joining ray cluster", extra={"address": address})
        ray.init(address=address, log_to_driver=False)
        return
    kwargs = {"num_cpus": num_cpus} if num_cpus > 0 else {}
    ray.init(
        address="local",  # never silently join another Ray that happens to run on this machine
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    log.info("started local ray", extra={"cpus": ray.cluster_resources().get("CPU")})
