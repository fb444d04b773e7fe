"""Running real service processes in tests and watching their Kafka events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prolifscore.core.broker import free_port
from prolifscore.core.bus import Bus, DecodeError, decode
from prolifscore.core.settings import KafkaSettings
from prolifscore.v1 import pipeline_pb2 as pb


def kafka_env(k: KafkaSettings) -> dict[str, str]:
    return {
        "PROLIF_KAFKA_BOOTSTRAP": k.bootstrap_servers,
        "PROLIF_TOPIC_INGEST": k.topic_ingest,
        "PROLIF_TOPIC_TASKS": k.topic_tasks,
        "PROLIF_TOPIC_SHARDS": k.topic_shards,
        "PROLIF_TOPIC_STATUS": k.topic_status,
        "PROLIF_TOPIC_DLQ": k.topic_dlq,
        "PROLIF_TOPIC_PARTITIONS": str(k.partitions),
        "PROLIF_KAFKA_MAX_POLL_INTERVAL_MS": str(k.max_poll_interval_ms),
        "PROLIF_KAFKA_SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
    }


class ServiceProcess:
    """`python -m <module>` with its own health port; logs go to `log_path`."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> ServiceProcess:
        env = {
            **os.environ,
            **self.env,
            "PROLIF_HEALTH_PORT": str(self.health_port),
            "PROLIF_METRICS_PORT": "0",
            "PROLIF_RAY_NUM_CPUS": self.env.get("PROLIF_RAY_NUM_CPUS", "2"),
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc and self.proc.poll() is None, f"{self.module} died:\n{self.tail()}"
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

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> int | None:
        """SIGTERM (graceful), then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Watcher:
    """Collects every message of a topic (from the beginning) for assertions."""

    def __init__(self, bus: Bus, topic: str, msg_type: type, group: str) -> None:
        self.consumer = bus.consumer([topic], group)
        self.msg_type = msg_type
        self.items: list[Any] = []
        self.records: list[Any] = []

    def pump(self, timeout_ms: int = 300) -> None:
        for record in self.consumer.poll(timeout_ms=timeout_ms):
            self.records.append(record)
            try:
                self.items.append(decode(record.value, record.headers, self.msg_type))
            except DecodeError:
                self.items.append(None)

    def wait_for(self, pred: Callable[[list[Any]], bool], timeout: float = 120.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if pred(self.items):
                return self.items
        raise TimeoutError(f"condition not met after {timeout}s; saw {len(self.items)} messages")

    def close(self) -> None:
        self.consumer.close()


def final_status(events: list[pb.SlideStatus], slide_id: str) -> pb.SlideStatus | None:
    for ev in reversed(events):
        if (
            ev is not None
            and ev.slide_id == slide_id
            and ev.stage in (pb.STAGE_FILTERED, pb.STAGE_FAILED)
        ):
            return ev
    return None


def all_final(slide_ids: list[str]) -> Callable[[list[Any]], bool]:
    return lambda events: all(final_status(events, s) is not None for s in slide_ids)
