"""Ray start-up: join a configured cluster, or start a local one bound to loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Must be in the environment before `import ray` (Ray reads them at import time). Token auth
# stays on: a joining process reads the token from ~/.ray/auth_token (RAY_AUTH_TOKEN_PATH).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
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


class RayHead:
    """A local Ray head (`ray start --head --block`) that several service processes join.

    One shared cluster instead of one per service: start-up is paid once, and a service that
    dies does not take the cluster (or other services' workers) with it.
    """

    def __init__(self, port: int, num_cpus: int = 0, log_path: Path | None = None) -> None:
        self.port = port
        self.num_cpus = num_cpus
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> RayHead:
        env = {**LOOPBACK_ENV, **os.environ}
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run(
            [ray_cli, "get-auth-token", "--generate"], env=env, capture_output=True, check=True
        )
        cmd = [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Its own process group: every Ray process of this head can be ended together (Ctrl-C
        # in a terminal reaches the caller, which stops the head).
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.proc.returncode}")
            check = subprocess.run(
                [ray_cli, "status", f"--address={self.address}"], env=env, capture_output=True
            )
            if check.returncode == 0:
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"ray head on {self.address} not ready after {timeout}s")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to `ray start --block` drains the node and stops what it started; Ray's
        per-node agents (dashboard, runtime-env) can outlive it by tens of seconds, so the
        rest of its process group is then ended too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        end_process_group(self.proc.pid)


def end_process_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM to every process left in group `pgid`, SIGKILL after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the group is empty
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        os.killpg(pgid, signal.SIGKILL)  # also reached by unreaped zombies: harmless
