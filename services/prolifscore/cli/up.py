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

STATE = "stack.json"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="start broker, Ray, model server and services on 127.0.0.1")
    up.add_argument("--run-dir", type=Path, default=Path("data/run"))
    up.set_defaults(func=run_up)
    down = sub.add_parser("down", help="stop what `up` started")
    down.add_argument("--run-dir", type=Path, default=Path("data/run"))
    down.set_defaults(func=run_down)
    status = sub.add_parser("status", help="each component of the running stack and its address")
    status.add_argument("--run-dir", type=Path, default=Path("data/run"))
    status.set_defaults(func=run_status)


def local_stack(run_dir: Path, env: dict[str, str], services: Sequence[str]) -> EmbeddedStack:
    """The embedded stack running `services`. On one machine scoring reads the served models'
    export metadata (the detector's threshold, untrained flags) from the model server's root,
    unless `env` names another folder."""
    from prolifscore.core.runtime.settings import load
    from prolifscore.localstack.stack import EmbeddedStack
    from prolifscore.modelserver.config import ModelServerSettings

    if "modelserver" in services:
        root = load(ModelServerSettings, environ={**os.environ, **env}).model_root
        env = {"PROLIF_MODEL_METADATA_ROOT": str(Path(root).resolve()), **env}
    return EmbeddedStack(run_dir, env=env, services=tuple(services))


def run_up(args: argparse.Namespace) -> int:
    """Foreground supervisor: restarts a service that dies (safe: every service redoes
    uncommitted work) and stops everything on Ctrl-C, SIGTERM or `prolifscore down`."""
    from prolifscore.localstack.stack import ALL_SERVICES

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_dir = args.run_dir.resolve()
    stack = local_stack(run_dir, dict(os.environ), ALL_SERVICES)
    stack.start()
    state = {
        "pid": os.getpid(),
        "broker": stack.env["PROLIF_KAFKA_BOOTSTRAP"],
        "ray": stack.env["PROLIF_RAY_ADDRESS"],
        "services": {n: p.grpc_address for n, p in stack.processes.items()},
        "viewer": f"http://127.0.0.1:{stack.env['PROLIF_VIEWER_PORT']}/",
        "logs": str(run_dir),
    }
    (run_dir / STATE).write_text(json.dumps(state, indent=2))
    print(json.dumps(state, indent=2), flush=True)
    try:
        while not stop.wait(2.0):
            for name, proc in stack.processes.items():
                if not proc.alive():
                    code = proc.proc.returncode if proc.proc else None
                    print(
                        f"{name} exited ({code}); restarting, log {proc.log_path}",
                        file=sys.stderr,
                        flush=True,
                    )
                    proc.start(timeout=180)
    finally:
        stack.stop()
        (run_dir / STATE).unlink(missing_ok=True)
    return 0


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
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    state = _state(args.run_dir)
    if state is None:
        print("not running")
        return 1
    print(f"{'broker':<12} {state['broker']}")
    print(f"{'ray':<12} {state['ray']}")
    if "viewer" in state:
        print(f"{'viewer-http':<12} {state['viewer']}")
    for name, address in state["services"].items():
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as exc:
            health = f"unreachable ({exc.code().name})"  # type: ignore[attr-defined]
        print(f"{name:<12} {address:<22} {health}")
    return 0
