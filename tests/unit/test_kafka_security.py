"""Kafka security settings -> kafka-python keyword arguments and librdkafka properties."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from prolifscore.core.runtime.kafka_security import (
    KafkaSecurityError,
    kafka_client_kwargs,
    librdkafka_config,
    resolve,
)
from prolifscore.core.runtime.settings import KafkaSettings, load


def settings(**env: str) -> KafkaSettings:
    return load(KafkaSettings, environ={f"PROLIF_KAFKA_{k.upper()}": v for k, v in env.items()})


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca", "cert", "key"):
        (tmp_path / f"{name}.pem").write_text(f"-----BEGIN {name}-----\n")
        files[name] = str(tmp_path / f"{name}.pem")
    return files


def test_plaintext_is_the_default_and_adds_nothing_else():
    assert kafka_client_kwargs(settings()) == {"security_protocol": "PLAINTEXT"}
    assert librdkafka_config(settings()) == {"security.protocol": "plaintext"}


def test_sasl_ssl_with_mutual_tls(pem):
    s = settings(
        security_protocol="sasl_ssl",
        ssl_ca_file=pem["ca"],
        ssl_cert_file=pem["cert"],
        ssl_key_file=pem["key"],
        sasl_mechanism="scram-sha-512",
        sasl_username="svc",
        sasl_password="pw",
    )
    assert kafka_client_kwargs(s) == {
        "security_protocol": "SASL_SSL",
        "ssl_cafile": pem["ca"],
        "ssl_certfile": pem["cert"],
        "ssl_keyfile": pem["key"],
        "ssl_check_hostname": True,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    assert librdkafka_config(s) == {
        "security.protocol": "sasl_ssl",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": pem["ca"],
        "ssl.certificate.location": pem["cert"],
        "ssl.key.location": pem["key"],
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "pw",
    }
    assert "pw" not in repr(resolve(s))


@pytest.mark.parametrize("client", [KafkaProducer, KafkaConsumer, KafkaAdminClient])
def test_every_keyword_is_one_kafka_python_accepts(client):
    s = settings(
        security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"
    )
    assert set(kafka_client_kwargs(s)) <= set(client.DEFAULT_CONFIG)


def test_tls_without_a_ca_file_trusts_the_system_store():
    kwargs = kafka_client_kwargs(settings(security_protocol="SSL"))
    assert kwargs["ssl_cafile"] is None and kwargs["ssl_check_hostname"] is True
    assert "ssl.ca.location" not in librdkafka_config(settings(security_protocol="SSL"))


def test_password_file_wins_and_loses_one_trailing_newline(tmp_path):
    (tmp_path / "pw").write_text("from file \n\n")
    (tmp_path / "crlf").write_bytes(b"windows\r\n")
    base = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": "u",
        "sasl_password": "from env",
    }
    s = settings(**base, sasl_password_file=str(tmp_path / "pw"))
    assert kafka_client_kwargs(s)["sasl_plain_password"] == "from file \n"
    s = settings(**base, sasl_password_file=str(tmp_path / "crlf"))
    assert librdkafka_config(s)["sasl.password"] == "windows"
    assert kafka_client_kwargs(settings(**base))["sasl_plain_password"] == "from env"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"security_protocol": "TLS"}, "PROLIF_KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u"},
            "PROLIF_KAFKA_SASL_MECHANISM='GSSAPI' is not one of PLAIN, SCRAM-SHA-256",
        ),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "SASL needs a user: PROLIF_KAFKA_SASL_USERNAME is empty",
        ),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
            },
            "SASL needs a password: PROLIF_KAFKA_SASL_PASSWORD is empty",
        ),
        (
            {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "u",
                "sasl_password": "p",
                "sasl_password_file": "/nonexistent/pw",
            },
            "PROLIF_KAFKA_SASL_PASSWORD_FILE=/nonexistent/pw: No such file",
        ),
        (
            {"security_protocol": "SSL", "ssl_ca_file": "/nonexistent/ca.pem"},
            "PROLIF_KAFKA_SSL_CA_FILE=/nonexistent/ca.pem: No such file",
        ),
        (
            {"security_protocol": "SSL", "ssl_cert_file": "/etc/hostname"},
            "PROLIF_KAFKA_SSL_CERT_FILE and PROLIF_KAFKA_SSL_KEY_FILE go together",
        ),
        (
            {"ssl_ca_file": "/etc/hostname", "sasl_username": "u"},
            "PROLIF_KAFKA_SSL_CA_FILE, PROLIF_KAFKA_SASL_USERNAME set, but "
            "PROLIF_KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use them",
        ),
        (
            {"security_protocol": "SSL", "sasl_password": "p"},
            "PROLIF_KAFKA_SASL_PASSWORD set, but PROLIF_KAFKA_SECURITY_PROTOCOL=SSL",
        ),
    ],
)
def test_inconsistent_settings_fail_at_startup_naming_the_variable(env, message):
    with pytest.raises(KafkaSecurityError) as failure:
        kafka_client_kwargs(settings(**env))
    assert message in str(failure.value)
    with pytest.raises(KafkaSecurityError):
        librdkafka_config(settings(**env))


def test_unreadable_password_file(tmp_path):
    (tmp_path / "dir").mkdir()
    s = settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password_file=str(tmp_path / "dir"),
    )
    with pytest.raises(KafkaSecurityError, match=r"PROLIF_KAFKA_SASL_PASSWORD_FILE=.*dir"):
        kafka_client_kwargs(s)
