"""The embedded runtime: broker, Ray head and service processes on 127.0.0.1, supervised.

Used by `prolifscore demo` and by the end-to-end tests, so both run the very processes a
deployment runs, only on one machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.runtime.tls import TLSFiles, open_channel
from prolifscore.localstack.broker import EmbeddedBroker, die_with_parent, free_port
from prolifscore.localstack.rayhead import RayHead, terminate

T = TypeVar("T")

# name -> (module, environment variable naming its gRPC port), in start-up order.
SERVICE_MODULES = {
    "modelserver": ("prolifscore.modelserver.server", "PROLIF_MODEL_SERVER_PORT"),
    "tiling": ("prolifscore.tiling.server", "PROLIF_GRPC_PORT"),
    "filtering": ("prolifscore.filtering.server", "PROLIF_GRPC_PORT"),
    "training": ("prolifscore.training.server", "PROLIF_GRPC_PORT"),
    "scoring": ("prolifscore.scoring.server", "PROLIF_SCORING_PORT"),
    "viewer": ("prolifscore.viewer.server", "PROLIF_GRPC_PORT"),
}
ALL_SERVICES = tuple(SERVICE_MODULES)


class ServiceProcess:
    """`python -m <module>` on its own health port, logging to `log_path`."""

    def __init__(
        self, module: str, env: dict[str, str], log_path: Path, port_env: str = "PROLIF_GRPC_PORT"
    ) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.port_env = port_env
        self.grpc_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def launch(self) -> ServiceProcess:
        """Start the process without waiting: several services start side by side."""
        env = {**os.environ, **self.env, self.port_env: str(self.grpc_port)}
        env.setdefault("PROLIF_METRICS_PORT", "0")
        env.setdefault("PROLIF_MODEL_SERVER_REST_PORT", "0")  # several model servers may run
        # A service outlives nothing that started it: orphans of a killed `up` would join
        # whatever broker takes their old port next. (PDEATHSIG fires when the forking *thread*
        # ends, so it is armed from the main thread only.)
        main = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if main and sys.platform == "linux" else None,
            )
        self.started_at = time.monotonic()
        return self

    def start(self, timeout: float = 90.0) -> ServiceProcess:
        self.launch().wait_serving(timeout)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, timeout: float = 2.0, service: str = "") -> str:
        """The gRPC health of the whole process ("SERVING", "NOT_SERVING", ...) or of one of
        its services, or why none."""
        tls = load(RuntimeSettings, environ={**os.environ, **self.env})
        return check_health(self.grpc_address, timeout, tls, service)

    def wait_serving(self, timeout: float) -> None:
        """Until the gRPC health check says SERVING (the consumer has joined its group); over
        the TLS the service's environment sets up, with its certificate."""
        deadline = time.monotonic() + timeout
        tls = load(RuntimeSettings, environ={**os.environ, **self.env})
        with open_channel(self.grpc_address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.module} exited during start-up:\n{self.tail()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise TimeoutError(f"{self.module} not serving after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def kill(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (graceful: in-flight work finishes and commits), then SIGKILL."""
        if self.proc is None:
            return None
        return terminate(self.proc, timeout)


def check_health(
    address: str, timeout: float = 2.0, tls: TLSFiles | None = None, service: str = ""
) -> str:
    """`grpc.health.v1` status of `service` at `address` (default "": the whole process) by
    name, or `unreachable (CODE)`; over TLS when `tls` names a CA."""
    try:
        with open_channel(address, tls) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"  # type: ignore[attr-defined]


@dataclass
class EmbeddedStack:
    """Everything `make demo` needs, started in dependency order and stopped in reverse.

    Services get one environment: the caller's `env` plus the broker, Ray and model server
    addresses chosen here (all on 127.0.0.1, free ports). `broker_storage` is the folder of the
    broker's durable storage (None: in memory); `ray_address` joins a running Ray instead of
    starting a head."""

    run_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = ("tiling", "filtering")
    ray_cpus: int = 0
    broker_storage: Path | None = None
    ray_address: str = ""
    broker: EmbeddedBroker | None = None
    ray: RayHead | None = None
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def settings(self, cls: type[T]) -> T:
        """`cls` as the stack's services load it: the caller's environment, then the stack's."""
        return load(cls, environ={**os.environ, **self.env})

    def start(self) -> EmbeddedStack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = EmbeddedBroker(
                log_path=self.run_dir / "broker.log",
                storage=self.broker_storage,
            ).start()
            if not self.ray_address:
                self.ray = RayHead(free_port(), self.ray_cpus, self.run_dir / "ray.log").start()
            self.env = {
                **self.env,
                "PROLIF_KAFKA_BOOTSTRAP": self.broker.bootstrap,
                "PROLIF_RAY_ADDRESS": self.ray.address if self.ray else self.ray_address,
            }
            procs = {}
            for name in SERVICE_MODULES:
                if name in self.services:
                    module, port_env = SERVICE_MODULES[name]
                    procs[name] = ServiceProcess(
                        module, self.env, self.run_dir / f"{name}.log", port_env
                    )
            if "viewer" in procs and "PROLIF_VIEWER_PORT" not in self.env:
                self.env["PROLIF_VIEWER_PORT"] = str(_viewer_port())
            if "modelserver" in procs:  # clients must know its address before they start
                self.env["PROLIF_MODEL_SERVER"] = procs["modelserver"].grpc_address
            # Side by side: each waits on its own imports and group join (seconds each), and
            # clients of the model server retry until it serves.
            for name, proc in procs.items():
                proc.env = self.env
                self.processes[name] = proc.launch()
            for proc in procs.values():
                proc.wait_serving(timeout=180)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> dict[str, int | None]:
        codes = {name: p.stop() for name, p in reversed(self.processes.items())}
        if self.ray:
            self.ray.stop()
        if self.broker:
            self.broker.stop()
        return codes

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _viewer_port(preferred: int = 8088) -> int:
    """The viewer's usual port where it is free (a stable URL), else any free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()
