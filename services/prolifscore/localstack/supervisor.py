"""Keeping the embedded stack running: the broker, the Ray head and every service process are
watched and restarted when they die, as `prolifscore up` does.

A restart that fails (the broker cannot bind, a service exits at once) is reported, retried with
exponential backoff (2 s doubling to 60 s) and never ends the stack: the other components keep
running. Restarts reuse the same ports, so clients keep the addresses they know.

A broker with durable storage comes back with its topics, records and offsets: the services
resume where they were. An in-memory broker comes back empty: the supervisor says so loudly
(stderr, its log, and a FAILED status for every slide that was in flight, from the tiling
service's journal `core/runtime/inflight.py`) and restarts the services that use Kafka, whose
consumer positions and producer state belonged to the broker that is gone.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolifscore.core.runtime import inflight
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.failures import slide_failed
from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings
from prolifscore.localstack.stack import EmbeddedStack

log = logging.getLogger(__name__)

BACKOFF_START_S = 2.0
BACKOFF_MAX_S = 60.0
CRASH_LOOP_S = 30.0  # a service that dies this soon after its start counts as a failed restart
NO_KAFKA = ("modelserver", "viewer")  # services that keep no Kafka state


@dataclass
class Component:
    """What the supervisor knows about one component (shown by `prolifscore status`)."""

    name: str
    state: str = "running"
    restarts: int = 0
    failures: int = 0  # consecutive failed restarts (a crash soon after a start is one)
    retry_at: float = 0.0
    last_error: str = ""
    started: float = 0.0  # monotonic time of its last restart (0: never restarted)


class Supervisor:
    """Checks the stack's components (`check`, or `run` until stopped) and restarts the dead."""

    def __init__(
        self,
        stack: EmbeddedStack,
        report: Callable[[str], None] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.stack = stack
        self._report = report or (lambda text: print(text, file=sys.stderr, flush=True))
        self.log_path = log_path
        names = ["broker", *(["ray"] if stack.ray else []), *stack.processes]
        self.components = {name: Component(name) for name in names}
        self.lock = threading.Lock()

    # -- what is alive -----------------------------------------------------------------------

    def alive(self, name: str) -> bool:
        if name == "broker":
            return self.stack.broker is not None and self.stack.broker.running()
        if name == "ray":
            head = self.stack.ray
            return head is not None and head.proc is not None and head.proc.poll() is None
        return self.stack.processes[name].alive()

    def pid(self, name: str) -> int | None:
        if name == "broker":
            return self.stack.broker.pid if self.stack.broker else None
        if name == "ray":
            head = self.stack.ray
            return head.proc.pid if head and head.proc else None
        return self.stack.processes[name].pid

    def state(self) -> dict[str, dict[str, Any]]:
        """Per component: pid, address, state, restarts and the last error (for stack.json)."""
        addresses = {
            "broker": self.stack.env.get("PROLIF_KAFKA_BOOTSTRAP", ""),
            "ray": self.stack.env.get("PROLIF_RAY_ADDRESS", ""),
            **{n: p.grpc_address for n, p in self.stack.processes.items()},
        }
        out = {}
        for name, c in self.components.items():
            out[name] = {
                "pid": self.pid(name),
                "address": addresses.get(name, ""),
                "state": c.state,
                "restarts": c.restarts,
                "last_error": c.last_error,
            }
        broker = self.stack.broker
        if broker is not None:
            out["broker"].update(store_pid=broker.store_pid, storage=broker.describe())
        return out

    # -- supervising -------------------------------------------------------------------------

    def run(self, stop: threading.Event, every_s: float = 1.0, on_change: Any = None) -> None:
        """Check every `every_s` seconds until `stop` is set; `on_change()` after a change."""
        while not stop.wait(every_s):
            try:
                changed = self.check()
            except Exception as exc:  # never let one bad check end the stack
                log.exception("supervisor check failed")
                self.say(f"supervisor: check failed: {type(exc).__name__}: {exc}")
                continue
            if changed and on_change is not None:
                on_change()

    def check(self) -> bool:
        """One pass: restart what died (when its backoff allows). Whether anything changed."""
        with self.lock:
            changed = False
            for name, c in self.components.items():
                now = time.monotonic()
                if self.alive(name):
                    if c.failures and now - c.started >= CRASH_LOOP_S:
                        c.failures = 0  # up long enough: not a crash loop any more
                    if c.state != "running":
                        c.state, changed = "running", True
                    continue
                if c.state == "running":  # found dead now
                    changed = True
                    self.say(f"{name} (pid {self.pid(name)}) died; restarting it")
                    if c.started and now - c.started < CRASH_LOOP_S:
                        self._failed(c, f"exited {now - c.started:.0f} s after its start")
                if now >= c.retry_at:
                    self._restart(c)
            return changed

    def _restart(self, c: Component) -> None:
        try:
            if c.name == "broker":
                assert self.stack.broker is not None
                self.stack.broker.start()
            elif c.name == "ray":
                assert self.stack.ray is not None
                self.stack.ray.stop()
                self.stack.ray.start()
            else:
                self.stack.processes[c.name].launch()
        except Exception as exc:
            self._failed(c, f"restart failed: {type(exc).__name__}: {exc}")
            return
        c.started = time.monotonic()
        c.restarts += 1
        c.state = "running"
        self.say(f"{c.name} restarted (pid {self.pid(c.name)}, restart {c.restarts})")
        if c.name == "broker":
            self._broker_back()

    def _failed(self, c: Component, error: str) -> None:
        """Count a failed (re)start and schedule the next try with backoff."""
        c.failures += 1
        delay = min(BACKOFF_START_S * 2 ** (c.failures - 1), BACKOFF_MAX_S)
        c.retry_at = time.monotonic() + delay
        c.last_error = error
        c.state = f"down: {error}; next try in {delay:.0f} s"
        self.say(f"{c.name}: {error}; trying again in {delay:.0f} s", level=logging.ERROR)

    def _broker_back(self) -> None:
        broker = self.stack.broker
        assert broker is not None
        if broker.durable:
            self.say(f"broker back on {broker.bootstrap}; {broker.describe()}: nothing was lost")
            return
        try:
            self._announce_loss()
        except Exception as exc:  # the broker runs; say what could not be done
            log.exception("announcing the lost work failed")
            self.say(f"could not report the lost slides: {type(exc).__name__}: {exc}")

    def _announce_loss(self) -> None:
        """An in-memory broker came back empty: say what was lost, fail the slides in flight,
        restart the services whose Kafka state died with it."""
        broker = self.stack.broker
        assert broker is not None
        k = self.stack.settings(KafkaSettings)
        root = self.stack.settings(RuntimeSettings).tiles_root
        lost = inflight.pending(root)
        reason = (
            f"the embedded broker {broker.bootstrap} restarted with in-memory storage and lost "
            "this slide's queued tile tasks; ingest it again (use durable storage to keep work "
            "across broker restarts)"
        )
        slides = ", ".join(sorted({r["slide_id"] for r in lost})) or "none recorded"
        self.say(
            "\n".join(
                [
                    "!" * 78,
                    f"!! THE BROKER {broker.bootstrap} RESTARTED EMPTY (in-memory storage).",
                    "!! Lost: queued slides and tile tasks, status events, dead letters and",
                    "!! committed offsets.",
                    f"!! Slides in flight, now reported FAILED: {slides}",
                    "!! Slides ingested but not yet tiled are lost too: ingest them again.",
                    "!" * 78,
                ]
            ),
            level=logging.ERROR,
        )
        with Bus(k, "stack") as bus:
            bus.ensure_topics([k.topic_ingest, k.topic_tasks, k.topic_shards, k.topic_status])
            bus.ensure_topics([k.topic_dlq])
            for r in lost:
                slide_failed(
                    bus,
                    reason,
                    slide_id=r["slide_id"],
                    path=r.get("path", ""),
                    run_id=r.get("run_id", ""),
                    batch_count=int(r.get("batch_count", 0)),
                    spec_hash=r.get("spec_hash", ""),
                )
            bus.flush()
        for r in lost:
            inflight.end(root, r["slide_id"], r.get("spec_hash", ""))
        for name, proc in self.stack.processes.items():
            if name not in NO_KAFKA:
                proc.stop(timeout=10)
                proc.launch()
                self.components[name].started = time.monotonic()
                self.components[name].restarts += 1
                self.say(f"{name} restarted on the new broker (pid {proc.pid})")

    def say(self, text: str, level: int = logging.WARNING) -> None:
        """Report on stderr (or the given reporter) and in the supervisor's log file."""
        log.log(level, text)
        self._report(text)
        if self.log_path is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with self.log_path.open("a") as f:
                f.write(f"{stamp} {text}\n")
