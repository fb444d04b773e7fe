"""`prolifscore up | down | status`: the embedded runtime as a long-running local stack."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prolifscore.localstack.stack import EmbeddedStack
    from prolifscore.localstack.supervisor import Supervisor

STATE = "stack.json"
STORAGE = ("durable", "memory")


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    """`--broker-storage durable|memory` (default PROLIF_BROKER_STORAGE, else durable)."""
    default = os.environ.get("PROLIF_BROKER_STORAGE", "durable")
    parser.add_argument(
        "--broker-storage",
        choices=STORAGE,
        default=default if default in STORAGE else "durable",
        help="durable: the broker keeps topics, records and offsets under the run directory "
        "across restarts (default); memory: faster, lost when the broker stops",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="start broker, Ray, model server and services on 127.0.0.1")
    up.add_argument("--run-dir", type=Path, default=Path("data/run"))
    add_storage_option(up)
    up.set_defaults(func=run_up)
    down = sub.add_parser("down", help="stop what `up` started")
    down.add_argument("--run-dir", type=Path, default=Path("data/run"))
    down.set_defaults(func=run_down)
    status = sub.add_parser("status", help="each component of the running stack and its address")
    status.add_argument("--run-dir", type=Path, default=Path("data/run"))
    status.set_defaults(func=run_status)


def local_stack(
    run_dir: Path, env: dict[str, str], services: Sequence[str], broker_storage: str = "durable"
) -> EmbeddedStack:
    """The embedded stack running `services`, its broker's durable storage (if chosen) in
    `run_dir/broker`. On one machine scoring reads the served models' export metadata (the
    detector's threshold, untrained flags) from the model server's root, unless `env` names
    another folder."""
    from prolifscore.core.runtime.settings import load
    from prolifscore.localstack.stack import EmbeddedStack
    from prolifscore.modelserver.config import ModelServerSettings

    if "modelserver" in services:
        root = load(ModelServerSettings, environ={**os.environ, **env}).model_root
        env = {"PROLIF_MODEL_METADATA_ROOT": str(Path(root).resolve()), **env}
    storage = run_dir / "broker" if broker_storage == "durable" else None
    return EmbeddedStack(run_dir, env=env, services=tuple(services), broker_storage=storage)


def run_up(args: argparse.Namespace) -> int:
    """Foreground supervisor (`localstack/supervisor.py`): restarts whatever dies, the broker
    included (safe: every service redoes uncommitted work), survives restarts that fail, and
    stops everything on Ctrl-C, SIGTERM or `prolifscore down`."""
    from prolifscore.localstack.stack import ALL_SERVICES
    from prolifscore.localstack.supervisor import Supervisor

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_dir = args.run_dir.resolve()
    stack = local_stack(run_dir, dict(os.environ), ALL_SERVICES, args.broker_storage)
    stack.start()
    supervisor = Supervisor(stack, log_path=run_dir / "supervisor.log")
    write_state(run_dir, supervisor)
    print((run_dir / STATE).read_text(), flush=True)
    try:
        supervisor.run(stop, every_s=1.0, on_change=lambda: write_state(run_dir, supervisor))
    finally:
        stack.stop()
        (run_dir / STATE).unlink(missing_ok=True)
    return 0


def write_state(run_dir: Path, supervisor: Supervisor) -> None:
    """`stack.json`: what `status` and `down` read (the supervisor's PID, addresses, and each
    component's PID and state), replaced atomically."""
    stack = supervisor.stack
    state = {
        "pid": os.getpid(),
        "broker": stack.env["PROLIF_KAFKA_BOOTSTRAP"],
        "ray": stack.env["PROLIF_RAY_ADDRESS"],
        "services": {n: p.grpc_address for n, p in stack.processes.items()},
        "logs": str(run_dir),
        "components": supervisor.state(),
    }
    if "PROLIF_VIEWER_PORT" in stack.env:
        state["viewer"] = f"http://127.0.0.1:{stack.env['PROLIF_VIEWER_PORT']}/"
    tmp = run_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / STATE)


def _state(run_dir: Path) -> dict | None:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.exists() else None


def run_down(args: argparse.Namespace) -> int:
    state = _state(args.run_dir)
    if state is None:
        print("nothing running", file=sys.stderr)
        return 0
    pid = state["pid"]
    if not _alive(pid):
        print(f"stack {pid} is gone (crashed?); removing its state file", file=sys.stderr)
        (args.run_dir / STATE).unlink(missing_ok=True)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 300  # services get a grace period each, then Ray, the broker
    while time.monotonic() < deadline:
        if not (args.run_dir / STATE).exists() or not _alive(pid):
            return 0  # `up` removes the state file once everything it started has stopped
        time.sleep(0.5)
    print(f"stack {pid} still running", file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped by its parent) does not."""
    if not Path("/proc/self").exists():  # not Linux: no zombie check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_status(args: argparse.Namespace) -> int:
    """Every component with its PID and its real state: a PID that is gone shows DOWN, the
    broker answers a Kafka metadata request or not, services answer gRPC health. Exit code 1
    when the stack is not running or its supervisor is gone."""
    from prolifscore.core.runtime.settings import RuntimeSettings, load
    from prolifscore.localstack.stack import check_health

    tls = load(RuntimeSettings)  # the stack's PROLIF_TLS_* (mutual TLS needs a certificate)
    state = _state(args.run_dir)
    if state is None:
        print("not running")
        return 1
    components = state.get("components") or {}
    up_alive = _alive(state["pid"])
    print(f"{'stack':<12} {state['pid']:<8} {'':<22} {'SERVING' if up_alive else 'DOWN'}")
    if not up_alive:
        print(f"the supervisor (`prolifscore up`, pid {state['pid']}) is gone", file=sys.stderr)
    rows = [("broker", state["broker"]), ("ray", state["ray"]), *state["services"].items()]
    for name, address in rows:
        info = components.get(name, {})
        pid = info.get("pid")
        if pid is not None and not _alive(pid):
            health = f"DOWN (pid {pid} gone)"
        elif name == "broker":
            health = _broker_health(address, info)
        elif name == "ray":
            health = "SERVING" if _port_open(address) else "DOWN (no answer)"
        else:
            health = check_health(address, tls=tls)
        if health != "SERVING" and info.get("state", "running") != "running":
            health += f"; supervisor: {info['state']}"
        print(f"{name:<12} {pid or '-':<8} {address:<22} {health}")
    if "viewer" in state:
        print(f"{'viewer-http':<12} {'-':<8} {state['viewer']}")
    storage = components.get("broker", {}).get("storage")
    if storage:
        print(f"(broker storage: {storage})")
    return 0 if up_alive else 1


def _port_open(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _broker_health(address: str, info: dict) -> str:
    """SERVING if the broker answers a Kafka metadata request (and its store process lives)."""
    from prolifscore.core.runtime.bus import Bus
    from prolifscore.core.runtime.settings import KafkaSettings, load

    store = info.get("store_pid")
    if store is not None and not _alive(store):
        return f"DOWN (object store pid {store} gone)"
    if not _port_open(address):
        return "DOWN (no answer)"
    with Bus(load(KafkaSettings, bootstrap_servers=address), "status") as bus:
        return "SERVING" if bus.reachable(timeout=3.0) else "NOT_SERVING (no Kafka answer)"
