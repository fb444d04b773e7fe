"""A local Ray head that several service processes of the embedded stack join."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prolifscore.core.runtime.ray import LOOPBACK_ENV
from prolifscore.localstack.broker import die_with_parent

# Ray (2.60) answers SIGTERM to `ray start` by draining the node (for Ray Serve's proxies): it
# waits up to 30 s for every worker lease to be returned. A detached actor never returns its own
# (Ray Train leaves its state actor, detached, on the cluster), so after any Ray Train run each
# stop waited the full 30 s, then our SIGKILL, then 5 s for the orphaned raylet (measured: 35 s;
# 1.2 s with the drain off). Nothing here uses Serve: 0 skips the drain; what the head started
# is still ended.
NO_DRAIN_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


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
        env = {**LOOPBACK_ENV, **NO_DRAIN_ENV, **os.environ}
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
        main = threading.current_thread() is threading.main_thread()  # see die_with_parent
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if main and sys.platform == "linux" else None,
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
        terminate(self.proc, timeout)
        end_process_group(self.proc.pid)


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the return code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
