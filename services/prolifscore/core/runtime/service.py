"""What every service process shares: health + reflection gRPC server, Prometheus endpoint,
SIGTERM handling, the broker watch (health NOT_SERVING and `prolif_broker_up` 0 while the broker
is unreachable), the consume -> work -> publish -> commit loop, and `run_service`, the whole life
of a process from settings to shutdown."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prolifscore.core.runtime import metrics, tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.delivery import Delivery
from prolifscore.core.runtime.logs import setup_logging
from prolifscore.core.runtime.metrics import start_metrics_server
from prolifscore.core.runtime.ray import init_ray
from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings, load
from prolifscore.core.runtime.tls import server_credentials
from prolifscore.core.runtime.tracing_grpc import server_interceptors

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
Handler = Callable[[list[tuple[Any, M]]], None]
BROKER_PROBE_S = 2.0  # how often a service checks that its broker answers
# The health name a liveness probe asks for: SERVING while the process runs, whatever its broker
# or dependencies do ("" is readiness: NOT_SERVING while the broker is unreachable, and a
# restart would not bring the broker back).
LIVENESS = "prolifscore.liveness"
# What a server takes unless its service says otherwise: requests are references and options,
# never pixels, so 1 MiB is ample; larger messages fail in the transport (RESOURCE_EXHAUSTED).
DEFAULT_GRPC_OPTIONS: dict[str, Any] = {"grpc.max_receive_message_length": 1024 * 1024}


@runtime_checkable
class Worker(Protocol[M]):
    """A service's handler that also reports an item it gives up on (a poison record) where the
    item's users look, e.g. a FAILED slide status."""

    def handle(self, items: list[tuple[Any, M]]) -> None: ...

    def abandon(self, record: Any, msg: M, reason: str) -> None: ...


class _ServiceSettings(Protocol):
    @property
    def runtime(self) -> RuntimeSettings: ...


S = TypeVar("S", bound=_ServiceSettings)


class ServiceRuntime:
    """Owns the process-level plumbing so a service only writes its `handle` function."""

    def __init__(
        self,
        name: str,
        settings: RuntimeSettings,
        *,
        grpc_options: Sequence[tuple[str, Any]] = (),
        max_workers: int = 4,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        """`grpc_options` (e.g. message size limits) and `interceptors` apply to every service
        the runtime's server hosts (with tracing on, each call first enters its span); add
        servicers to `self.server` before `start()`."""
        self.name = name
        self.settings = settings
        self.stopping = threading.Event()
        self.health = health.HealthServicer()
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers),
            options=list({**DEFAULT_GRPC_OPTIONS, **dict(grpc_options)}.items()),
            interceptors=[*server_interceptors(), *interceptors],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.metrics_port = 0
        self._extra_services: list[str] = []
        self._serving = False
        self._broker_up: bool | None = None  # None: the service uses no broker

    def add_service(self, full_name: str) -> None:
        """Register another gRPC service (its servicer already added to `self.server`)."""
        self._extra_services.append(full_name)

    def start(self) -> ServiceRuntime:
        names = [*self._extra_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        host = self.settings.bind_host
        address = f"{host}:{self.settings.grpc_port}"
        creds = server_credentials(self.settings)
        if creds is not None:
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        self.server.start()
        self.metrics_port = start_metrics_server(self.settings.metrics_port, host).server_port
        self.set_serving(False)
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "service started",
            extra={
                "grpc": f"{host}:{self.port}",
                "tls": "mutual" if creds and self.settings.tls_ca_file else bool(creds),
                "metrics": f"{host}:{self.metrics_port}",
            },
        )
        return self

    def set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._publish_health()

    def set_broker_up(self, up: bool) -> None:
        """What the broker watch saw: while the broker is unreachable, the process's overall
        health ("") and its own name say NOT_SERVING and `prolif_broker_up` is 0. gRPC APIs it
        hosts that work without the broker (`add_service`) keep their own status."""
        if up != self._broker_up:
            if self._broker_up is not None:
                (log.info if up else log.warning)(
                    "broker %s", "reachable again" if up else "unreachable: health NOT_SERVING"
                )
            metrics.BROKER_UP.labels(self.name).set(1 if up else 0)
        self._broker_up = up
        self._publish_health()

    def _publish_health(self) -> None:
        def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
            return (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )

        whole = self._serving and self._broker_up is not False
        for name in ("", self.name):
            self.health.set(name, status(whole))
        for name in self._extra_services:
            self.health.set(name, status(self._serving))

    def handle_signals(self) -> None:
        """Install SIGTERM/SIGINT handling. Call after ray.init(), which installs its own."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """Stop taking work; in-flight work gets `shutdown_grace_s` to finish and commit.
        Past that the process exits without committing, and the work is redone elsewhere."""
        if self.stopping.is_set():
            os._exit(130)
        log.info("stopping", extra={"signal": signum})
        self.stopping.set()
        self.set_serving(False)
        timer = threading.Timer(self.settings.shutdown_grace_s, self._hard_exit)
        timer.daemon = True
        timer.start()

    def _hard_exit(self) -> None:
        log.warning("in-flight work did not finish within the grace period; exiting uncommitted")
        os._exit(1)

    def serve_until_stopped(self) -> None:
        """For a service without a consumer: SERVING until SIGTERM / SIGINT (handled, so no
        KeyboardInterrupt)."""
        self.handle_signals()
        self.set_serving(True)
        self.stopping.wait()

    def stop(self) -> None:
        self.set_serving(False)
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace=2).wait()


def consume_loop(
    runtime: ServiceRuntime,
    bus: Bus,
    topics: Sequence[str],
    group_id: str,
    msg_type: type[M],
    handle: Callable[[list[tuple[Any, M]]], None],
    abandon: Callable[[Any, M, str], None] | None = None,
) -> None:
    """Poll a batch and hand it to `Delivery`: decode (undecodable records go to the dead-letter
    topic), let `handle` do the work and publish its outputs, flush, and only then commit.

    `handle` reports per-item failures itself (status event + dead letter). If it raises, the
    batch's records are retried one by one, and one that keeps failing is dead-lettered after
    PROLIF_MAX_ATTEMPTS tries and reported through `abandon`; an unreachable broker or
    dependency is retried until it is back.
    """
    consumer = bus.consumer(list(topics), group_id)
    runtime.handle_signals()
    runtime.set_serving(True)
    delivery = Delivery(runtime.name, bus, consumer, msg_type, handle, abandon, runtime.stopping)
    try:
        while not runtime.stopping.is_set():
            records = consumer.poll(timeout_ms=500)
            if records:
                delivery.process(records)
    finally:
        runtime.set_serving(False)
        consumer.close()


def watch_broker(runtime: ServiceRuntime, bus: Bus, every_s: float = BROKER_PROBE_S) -> None:
    """Probe the broker every `every_s` seconds until the runtime stops (a daemon thread)."""

    def loop() -> None:
        while True:
            runtime.set_broker_up(bus.reachable(timeout=every_s))
            if runtime.stopping.wait(every_s):
                return

    threading.Thread(target=loop, name="broker-watch", daemon=True).start()


def configure(name: str, cls: type[S]) -> S:
    """A service's settings from the environment, logging set up at their level first thing,
    then tracing when the settings turn it on."""
    settings = load(cls)
    setup_logging(name, settings.runtime.log_level)
    tracing.setup(name, settings.runtime.tracing)
    return settings


@dataclasses.dataclass(frozen=True)
class KafkaWork(Generic[M]):
    """The Kafka side of a service: the topic it consumes in its group, the topics it publishes
    to, and how it makes the handler of a decoded batch once the bus (and Ray) are up."""

    kafka: KafkaSettings
    consume: str
    group_id: str
    msg_type: type[M]
    handler: Callable[[Bus], Handler[M] | Worker[M]]
    produce: Sequence[str] = ()


def run_service(runtime: ServiceRuntime, work: KafkaWork[M] | None, *, ray: bool = True) -> None:
    """Run a service process until SIGTERM: start `runtime` (health says NOT_SERVING while the
    rest starts), join Ray, watch the broker, create the topics (the dead-letter topic too), then
    consume in `consume_loop`; without `work`, serve gRPC alone. Closes the bus and the runtime
    on exit."""
    started = time.monotonic()
    runtime.start()
    try:
        if ray:
            init_ray(runtime.settings.ray_address, runtime.settings.ray_num_cpus)
        if work is None:
            runtime.serve_until_stopped()
            return
        bus = Bus(work.kafka, runtime.name)
        try:
            watch_broker(runtime, bus)
            bus.ensure_topics([work.consume, *work.produce, work.kafka.topic_dlq])
            made = work.handler(bus)
            handle = made.handle if isinstance(made, Worker) else made
            abandon = made.abandon if isinstance(made, Worker) else None
            consume_loop(
                runtime, bus, [work.consume], work.group_id, work.msg_type, handle, abandon
            )
        finally:
            bus.close()
    finally:
        runtime.stop()
        log.info(
            "%s stopped",
            runtime.name,
            extra={"uptime_s": round(time.monotonic() - started, 1)},
        )
