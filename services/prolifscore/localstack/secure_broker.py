"""The embedded broker behind a TLS / SASL gateway, as one object and one command.

    python -m prolifscore.localstack.secure_broker --tls-cert C --tls-key K [--client-ca CA]
        [--users-file F] [--mechanisms PLAIN,SCRAM-SHA-512] [--port N]

prints the PROLIF_KAFKA_BOOTSTRAP and PROLIF_KAFKA_SECURITY_PROTOCOL for clients, then serves until
Ctrl-C / SIGTERM. The broker itself listens in plaintext on another 127.0.0.1 port
(`broker_bootstrap`); see kafka_gateway.py for why and what that means.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from prolifscore.localstack.broker import HOST, EmbeddedBroker
from prolifscore.localstack.kafka_frames import (
    AUTHENTICATE_MAX_VERSION,
    HANDSHAKE_MAX_VERSION,
    SASL_AUTHENTICATE,
    SASL_HANDSHAKE,
    sasl_versions,
)
from prolifscore.localstack.kafka_gateway import KafkaGateway, TlsConfig
from prolifscore.localstack.kafka_sasl import MECHANISMS, UserStore, load_users


class SecureEmbeddedBroker:
    """The embedded broker behind a KafkaGateway, started and stopped as one.

    `bootstrap` is the gateway (what clients use; the broker advertises it in metadata);
    `broker_bootstrap` is the broker's own plaintext port on 127.0.0.1, which the gateway cannot
    hide from local processes (see the README's "Kafka security").
    """

    def __init__(
        self,
        *,
        tls: TlsConfig | None = None,
        users: Mapping[str, str] | UserStore | None = None,
        mechanisms: Sequence[str] = MECHANISMS,
        port: int = 0,
        log_path: Path | None = None,
    ) -> None:
        if tls is None and users is None:
            raise ValueError("a secure broker needs TLS, SASL users or both")
        self.gateway = KafkaGateway(
            self._broker_address, tls=tls, users=users, mechanisms=mechanisms, port=port
        )
        self._log_path = log_path
        self.broker: EmbeddedBroker | None = None

    def _broker_address(self) -> tuple[str, int]:
        if self.broker is None:
            raise ConnectionError("the embedded broker is not running")
        return HOST, self.broker.port

    @property
    def bootstrap(self) -> str:
        return self.gateway.address

    @property
    def broker_bootstrap(self) -> str | None:
        return self.broker.bootstrap if self.broker else None

    def running(self) -> bool:
        return self.broker is not None and self.broker.running()

    def start(self, timeout: float = 30.0) -> SecureEmbeddedBroker:
        """Open the gateway (its port is then known), then start the broker advertising it."""
        if self.running():
            return self
        self.gateway.start()
        try:
            self.broker = EmbeddedBroker(
                log_path=self._log_path, advertised_host=HOST, advertised_port=self.gateway.port
            ).start(timeout)
            if self.gateway.users is not None:
                self._check_sasl_versions()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_sasl_versions(self) -> None:
        """Clients pick SASL versions from the broker's ApiVersions, which the gateway relays:
        refuse to start if the broker advertises one the gateway cannot answer."""
        versions = sasl_versions(*self._broker_address())
        answered = {
            SASL_HANDSHAKE: HANDSHAKE_MAX_VERSION,
            SASL_AUTHENTICATE: AUTHENTICATE_MAX_VERSION,
        }
        for api_key, most in answered.items():
            if api_key not in versions or versions[api_key][1] > most:
                raise RuntimeError(
                    f"the broker advertises API {api_key} versions {versions.get(api_key)}; "
                    f"the gateway answers versions 0-{most}"
                )

    def stop(self) -> None:
        self.gateway.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> SecureEmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the embedded broker behind a TLS/SASL gateway in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m prolifscore.localstack.secure_broker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: free)")
    parser.add_argument("--tls-cert", type=Path, help="PEM server certificate (enables TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--client-ca", type=Path, help="PEM CA that client certificates need")
    parser.add_argument("--users-file", type=Path, help="user:password lines (enables SASL)")
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS), help="SASL mechanisms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.client_ca and not args.tls_cert):
        parser.error("--tls-cert and --tls-key go together; --client-ca needs them")
    tls = TlsConfig(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        users = load_users(args.users_file) if args.users_file else None
        mechanisms = [m.strip().upper() for m in args.mechanisms.split(",") if m.strip()]
        secure = SecureEmbeddedBroker(tls=tls, users=users, mechanisms=mechanisms, port=args.port)
        secure.start()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    protocol = ("SASL_" if users else "") + ("SSL" if tls else "PLAINTEXT")
    print(
        f"Kafka gateway ready: PROLIF_KAFKA_BOOTSTRAP={secure.bootstrap} "
        f"PROLIF_KAFKA_SECURITY_PROTOCOL={protocol} (broker: {secure.broker_bootstrap}, "
        "plaintext, loopback only)",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            if not secure.running():
                print("broker exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        secure.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
