"""Kafka TLS, mutual TLS and SASL (PLAIN, SCRAM-SHA-256/512) through the gateway in front of the
embedded broker, with kafka-python and librdkafka (confluent-kafka) clients configured from
KafkaSettings; and the librdkafka contract: ingest in, status out, with a real tiling service.

Certificates are made per module with the `openssl` command (a throwaway CA, a server certificate
for 127.0.0.1 and localhost, a client certificate, and a client certificate from another CA).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as RdTopicPartition
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.kafka_security import kafka_client_kwargs, librdkafka_config
from prolifscore.core.runtime.settings import KafkaSettings, load
from prolifscore.localstack.kafka_gateway import TlsConfig
from prolifscore.localstack.secure_broker import SecureEmbeddedBroker
from prolifscore.v1 import pipeline_pb2 as pb
from tests.harness import ServiceProcess
from tests.slides import CMU, SLIDES

USERS = {"alice": "alice-Secret-1", "bob": "b:o=b, with spaces"}
REFUSED_S = 1.5  # how long a refused client keeps trying before giving up (locally it is refused
# within tens of milliseconds; kafka-python tries until this runs out, so every refusal costs it)


# ---------------------------------------------------------------------------------------------
# certificates and secured brokers


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=d,
    )


def _make_leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=d,
    )
    (d / f"{name}.ext").write_text(
        f"{extensions}\nbasicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext"),
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_leaf(
        d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    )
    _make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    _make_leaf(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth")
    return d


@pytest.fixture(scope="module")
def secure(pki: Path) -> Iterator[Callable[[str], SecureEmbeddedBroker]]:
    """Broker + gateway per security setup, started on first use and shared by the module."""
    tls = TlsConfig(pki / "server.pem", pki / "server.key")
    setups: dict[str, dict[str, Any]] = {
        "tls": {"tls": tls},
        "mtls": {"tls": TlsConfig(tls.cert_file, tls.key_file, client_ca_file=pki / "ca.pem")},
        "sasl": {"users": USERS},
        "sasl_ssl": {"tls": tls, "users": USERS, "mechanisms": ["SCRAM-SHA-512"]},
    }
    started: dict[str, SecureEmbeddedBroker] = {}

    def get(kind: str) -> SecureEmbeddedBroker:
        if kind not in started:
            started[kind] = SecureEmbeddedBroker(**setups[kind]).start()
        return started[kind]

    yield get
    for broker in started.values():
        broker.stop()


def settings_for(broker: SecureEmbeddedBroker, protocol: str, **fields: str) -> KafkaSettings:
    return load(
        KafkaSettings,
        environ={},
        bootstrap_servers=broker.bootstrap,
        security_protocol=protocol,
        **fields,
    )


def as_alice(broker: SecureEmbeddedBroker, protocol: str, mechanism: str) -> KafkaSettings:
    return settings_for(
        broker,
        protocol,
        sasl_mechanism=mechanism,
        sasl_username="alice",
        sasl_password=USERS["alice"],
    )


def tls_fields(pki: Path, cert: str | None = None) -> dict[str, str]:
    fields = {"ssl_ca_file": str(pki / "ca.pem")}
    if cert:
        fields |= {
            "ssl_cert_file": str(pki / f"{cert}.pem"),
            "ssl_key_file": str(pki / f"{cert}.key"),
        }
    return fields


# ---------------------------------------------------------------------------------------------
# one record through each client


def kafka_python_round_trip(s: KafkaSettings) -> None:
    topic, value = f"sec.{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    kwargs = kafka_client_kwargs(s)
    producer = KafkaProducer(bootstrap_servers=s.bootstrap_servers, **kwargs)
    try:
        producer.send(topic, value, partition=0).get(timeout=15)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers, auto_offset_reset="earliest", **kwargs
    )
    try:
        consumer.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + 20
        seen: list[bytes] = []
        while value not in seen and time.monotonic() < deadline:
            seen += [r.value for recs in consumer.poll(timeout_ms=300).values() for r in recs]
        assert seen == [value]
    finally:
        consumer.close()


def rd_config(s: KafkaSettings, errors: list[KafkaError]) -> dict[str, Any]:
    return {
        **librdkafka_config(s),
        "bootstrap.servers": s.bootstrap_servers,
        "error_cb": errors.append,
        "socket.timeout.ms": 5000,
    }


def librdkafka_round_trip(s: KafkaSettings) -> None:
    topic, value = f"sec.{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    errors: list[KafkaError] = []
    delivered: list[KafkaError | None] = []
    producer = Producer(rd_config(s, errors))
    producer.produce(topic, value, partition=0, on_delivery=lambda err, _: delivered.append(err))
    assert producer.flush(20) == 0 and delivered == [None], (delivered, errors)
    consumer = Consumer(
        rd_config(s, errors)
        | {"group.id": f"sec-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False}
    )
    try:
        consumer.assign([RdTopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 20
        seen: list[bytes] = []
        while value not in seen and time.monotonic() < deadline:
            msg = consumer.poll(0.3)
            if msg is not None and msg.error() is None:
                seen.append(msg.value())
        assert seen == [value], errors
    finally:
        consumer.close()


def bus_round_trip(s: KafkaSettings) -> None:
    """The services' own client: a Bus built from the same settings publishes, flushes and
    consumes in a group, as every service does. (Tansu's group join takes about half the session
    timeout: 2 s instead of the tests' usual 6 s makes each of these 1 s instead of 3 s.)"""
    s = dataclasses.replace(
        s, partitions=1, session_timeout_ms=2000, max_poll_interval_ms=8000, connect_timeout_s=20
    )
    topic, value = f"sec.{uuid.uuid4().hex[:8]}", uuid.uuid4().bytes
    with Bus(s, "security-test") as bus:
        bus.publish_bytes(topic, "key", value)
        bus.flush(timeout=15)
        consumer = bus.consumer([topic], f"g-{uuid.uuid4().hex[:6]}")
        deadline = time.monotonic() + 30
        seen: list[bytes] = []
        while value not in seen and time.monotonic() < deadline:
            seen += [r.value for r in consumer.poll(timeout_ms=300)]
        assert seen == [value]


ROUND_TRIP = {
    "kafka-python": kafka_python_round_trip,
    "librdkafka": librdkafka_round_trip,
    "prolifscore-bus": bus_round_trip,
}

CASES = {
    "tls": ("tls", "SSL", None, {}),
    "mtls": ("mtls", "SSL", "client", {}),
    "sasl-plain": ("sasl", "SASL_PLAINTEXT", None, {"sasl_mechanism": "PLAIN"}),
    "sasl-scram256": ("sasl", "SASL_PLAINTEXT", None, {"sasl_mechanism": "SCRAM-SHA-256"}),
    "sasl-scram512": ("sasl", "SASL_PLAINTEXT", None, {"sasl_mechanism": "SCRAM-SHA-512"}),
    "sasl_ssl-scram512": ("sasl_ssl", "SASL_SSL", None, {"sasl_mechanism": "SCRAM-SHA-512"}),
}


@pytest.mark.parametrize("client", list(ROUND_TRIP))
@pytest.mark.parametrize("case", list(CASES))
def test_records_round_trip_through_the_gateway(secure, pki, tmp_path, case, client):
    kind, protocol, cert, fields = CASES[case]
    broker = secure(kind)
    if protocol in ("SSL", "SASL_SSL"):
        fields = {**fields, **tls_fields(pki, cert)}
    if protocol.startswith("SASL_"):
        # bob's password (with ':' ',' '=' and spaces) comes from a file, as from a Secret
        (tmp_path / "password").write_text(USERS["bob"] + "\n")
        fields |= {"sasl_username": "bob", "sasl_password_file": str(tmp_path / "password")}
    stats = broker.gateway.stats
    before = stats.copy()
    ROUND_TRIP[client](settings_for(broker, protocol, **fields))
    if protocol.startswith("SASL_"):  # the connections went through the SASL exchange
        assert stats["authenticated"] > before["authenticated"]
    assert stats["auth_failures"] == before["auth_failures"]
    assert stats["tls_failures"] == before["tls_failures"]


def test_metadata_sends_clients_to_the_gateway_not_the_broker(secure):
    broker = secure("sasl")
    s = as_alice(broker, "SASL_PLAINTEXT", "PLAIN")
    errors: list[KafkaError] = []
    producer = Producer(rd_config(s, errors))
    brokers = producer.list_topics(timeout=10).brokers
    assert [f"{b.host}:{b.port}" for b in brokers.values()] == [broker.bootstrap]
    assert broker.bootstrap != broker.broker_bootstrap and not errors


# ---------------------------------------------------------------------------------------------
# refused clients


def kafka_python_refused(s: KafkaSettings) -> None:
    with pytest.raises(Exception, match="Unable to bootstrap"):
        KafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            bootstrap_timeout_ms=int(REFUSED_S * 1000),
            **kafka_client_kwargs(s),
        )


def librdkafka_errors(s: KafkaSettings) -> list[KafkaError]:
    """The errors a librdkafka producer reports while it tries to connect."""
    errors: list[KafkaError] = []
    producer = Producer(rd_config(s, errors))
    deadline = time.monotonic() + REFUSED_S
    while not errors and time.monotonic() < deadline:
        producer.poll(0.2)
    with pytest.raises(KafkaException):  # no metadata: nothing reached the broker
        producer.list_topics(timeout=0.5)
    return errors


@pytest.mark.parametrize("user", ["alice", "mallory"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_wrong_password_or_unknown_user_is_refused_with_a_clear_error(
    secure, caplog, mechanism, user
):
    broker = secure("sasl")
    s = settings_for(
        broker,
        "SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username=user,
        sasl_password="not-the-password",
    )
    expected = f"Authentication failed: invalid credentials with SASL mechanism {mechanism}"
    failures = broker.gateway.stats["auth_failures"]
    with caplog.at_level(logging.WARNING):
        kafka_python_refused(s)
    assert "SaslAuthenticationFailedError" in caplog.text and expected in caplog.text
    errors = librdkafka_errors(s)
    assert errors and errors[0].code() == KafkaError._AUTHENTICATION, errors
    assert expected in errors[0].str()
    assert broker.gateway.stats["auth_failures"] >= failures + 2
    # the gateway logged who failed and why, never the password
    logged = [r for r in caplog.records if r.getMessage() == "kafka gateway authentication failed"]
    assert logged and logged[0].user == user and logged[0].mechanism == mechanism
    assert "not-the-password" not in caplog.text


@pytest.mark.parametrize("cert", [None, "rogue"], ids=["no-client-cert", "cert-from-other-ca"])
def test_mtls_refuses_clients_without_a_valid_certificate(secure, pki, cert):
    broker = secure("mtls")
    s = settings_for(broker, "SSL", **tls_fields(pki, cert))
    before = broker.gateway.stats["tls_failures"]
    kafka_python_refused(s)
    errors = librdkafka_errors(s)
    refused = {KafkaError._SSL, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}
    assert errors and {e.code() for e in errors} <= refused, errors
    assert broker.gateway.stats["tls_failures"] >= before + 2
    assert broker.gateway.stats["connections"] > 0


def test_plaintext_client_on_the_tls_port_is_refused(secure):
    broker = secure("tls")
    s = settings_for(broker, "PLAINTEXT")
    before = broker.gateway.stats["tls_failures"]
    kafka_python_refused(s)
    assert librdkafka_errors(s)
    assert broker.gateway.stats["tls_failures"] >= before + 2


def test_sasl_client_on_a_sasl_ssl_port_without_tls_is_refused(secure):
    broker = secure("sasl_ssl")
    s = as_alice(broker, "SASL_PLAINTEXT", "SCRAM-SHA-512")
    before = broker.gateway.stats["tls_failures"]
    kafka_python_refused(s)
    assert broker.gateway.stats["tls_failures"] > before


# ---------------------------------------------------------------------------------------------
# the wire, below the clients


def _frame(api_key: int, version: int, correlation: int, body: bytes = b"") -> bytes:
    payload = struct.pack(">hhih", api_key, version, correlation, 4) + b"test" + body
    return struct.pack(">i", len(payload)) + payload


def _read(sock: socket.socket) -> bytes | None:
    """One size-prefixed frame, or None once the connection is closed."""
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">i", head)
    return sock.recv(size, socket.MSG_WAITALL) if size else b""


METADATA_V1_ALL = struct.pack(">i", -1)  # Metadata v1: all topics


def test_any_other_request_before_authentication_closes_the_connection(secure):
    broker = secure("sasl")
    host, port = broker.bootstrap.split(":")
    before = broker.gateway.stats["rejected"]
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_frame(3, 1, 7, METADATA_V1_ALL))
        assert sock.recv(1) == b""  # closed without an answer
    assert broker.gateway.stats["rejected"] == before + 1


def test_sasl_handshake_v0_with_bare_tokens_then_requests_pass_through(secure):
    """SaslHandshake v0 (pre-KIP-152): the PLAIN token follows without a Kafka header."""
    broker = secure("sasl")
    host, port = broker.bootstrap.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_frame(17, 0, 1, struct.pack(">h", 5) + b"PLAIN"))
        answer = _read(sock)
        assert answer is not None
        correlation, error, count = struct.unpack_from(">ihi", answer)
        assert (correlation, error, count) == (1, 0, 3)
        token = b"\0alice\0" + USERS["alice"].encode()
        sock.sendall(struct.pack(">i", len(token)) + token)
        assert _read(sock) == b""  # PLAIN's empty server answer
        sock.sendall(_frame(3, 1, 2, METADATA_V1_ALL))  # now relayed to the broker
        metadata = _read(sock)
        assert metadata is not None and struct.unpack_from(">i", metadata) == (2,)


# ---------------------------------------------------------------------------------------------
# the librdkafka contract with the services


@pytest.mark.slow
def test_librdkafka_client_ingests_slides_and_reads_their_status(
    kafka_settings, ray_head, tmp_path
):
    """confluent-kafka publishes SlideIngest (JSON and binary protobuf) to the embedded broker;
    the real tiling service answers on the status topic, which the same client reads."""
    k = kafka_settings
    with Bus(k, "test") as bus:
        bus.ensure_topics(
            [k.topic_ingest, k.topic_tasks, k.topic_shards, k.topic_status, k.topic_dlq]
        )
    env = {  # the Kafka settings the service needs, by their variables
        f.metadata["env"]: str(getattr(k, f.name))
        for f in dataclasses.fields(k)
        if f.name in ("bootstrap_servers", "partitions", "session_timeout_ms")
        or f.name.startswith(("topic_", "max_poll"))
    }
    env |= {"PROLIF_RAY_ADDRESS": ray_head.address, "PROLIF_SLIDE_ROOTS": str(SLIDES)}
    tiling = ServiceProcess("prolifscore.tiling.server", env, tmp_path / "tiling.log").start()
    try:
        errors: list[KafkaError] = []
        config = {"bootstrap.servers": k.bootstrap_servers, "error_cb": errors.append}
        producer = Producer(config)
        as_json = json.dumps({"slideId": "rd-json", "path": str(CMU), "spec": {"maxTiles": 3}})
        producer.produce(
            k.topic_ingest,
            as_json.encode(),
            key=b"rd-json",
            headers=[("content-type", b"application/json")],
        )
        missing = pb.SlideIngest(slide_id="rd-proto", path=str(SLIDES / "missing.svs"))
        producer.produce(
            k.topic_ingest,
            missing.SerializeToString(),
            key=b"rd-proto",
            headers=[("content-type", b"application/x-protobuf")],
        )
        assert producer.flush(20) == 0, errors
        consumer = Consumer({**config, "group.id": k.client_id, "enable.auto.commit": False})
        consumer.assign([RdTopicPartition(k.topic_status, p, OFFSET_BEGINNING) for p in (0, 1)])
        statuses: dict[str, pb.SlideStatus] = {}
        deadline = time.monotonic() + 120
        while len(statuses) < 2 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:  # binary protobuf, and says so
                assert ("content-type", b"application/x-protobuf") in (msg.headers() or [])
                status = pb.SlideStatus.FromString(msg.value())
                statuses[status.slide_id] = status
        consumer.close()
    finally:
        code, tail = tiling.stop(), tiling.tail()
    assert code == 0, tail
    assert statuses["rd-json"].stage == pb.STAGE_TILED, statuses["rd-json"]
    assert Path(statuses["rd-json"].path).resolve() == CMU.resolve()
    assert statuses["rd-proto"].stage == pb.STAGE_FAILED
    assert "does not exist" in statuses["rd-proto"].reason
    assert not errors


def test_secure_broker_command(pki, tmp_path):
    """`python -m prolifscore.localstack.secure_broker` prints what clients need, serves them,
    and stops cleanly on SIGINT."""
    users = tmp_path / "users"
    users.write_text("svc:" + USERS["alice"] + "\n")
    users.chmod(0o600)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prolifscore.localstack.secure_broker",
            *("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")),
            *("--users-file", str(users), "--mechanisms", "SCRAM-SHA-512"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = next(line for line in proc.stdout if line.startswith("Kafka gateway ready"))
        env = dict(word.split("=", 1) for word in line.split() if word.startswith("PROLIF_"))
        assert env["PROLIF_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        s = load(
            KafkaSettings,
            environ={
                **env,
                "PROLIF_KAFKA_SSL_CA_FILE": str(pki / "ca.pem"),
                "PROLIF_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "PROLIF_KAFKA_SASL_USERNAME": "svc",
                "PROLIF_KAFKA_SASL_PASSWORD": USERS["alice"],
            },
        )
        librdkafka_round_trip(s)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
