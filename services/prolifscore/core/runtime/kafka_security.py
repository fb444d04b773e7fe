"""Kafka TLS / SASL client options from KafkaSettings, for kafka-python and for librdkafka.

Checked once at startup (`resolve`), so a typo in a mechanism, a missing certificate or an
unreadable password file stops the service with a message naming the variable, instead of
retrying a connection that can never succeed or, worse, silently connecting without security.
Settings that would be ignored (a CA file with PLAINTEXT, a SASL user without SASL) are errors
too: whoever set them believes the connection is protected.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from prolifscore.core.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent or point at files that cannot be read."""


@dataclasses.dataclass(frozen=True)
class KafkaSecurity:
    """Validated security options; `password` is never shown by repr()."""

    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mechanism: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")


def _var(name: str) -> str:
    field = next(f for f in dataclasses.fields(KafkaSettings) if f.name == name)
    return str(field.metadata["env"])


def _readable_file(settings: KafkaSettings, name: str) -> str:
    path = Path(getattr(settings, name))
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise KafkaSecurityError(f"{_var(name)}={path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise KafkaSecurityError(f"{_var(name)}={path}: not a file")
    return str(path)


def _password(settings: KafkaSettings) -> str:
    """The password file wins over the variable; one trailing newline (as editors add) is cut."""
    if settings.sasl_password_file:
        path = Path(_readable_file(settings, "sasl_password_file"))
        text = path.read_text(encoding="utf-8")
        password = text.removesuffix("\n").removesuffix("\r")
        source = _var("sasl_password_file")
    else:
        password, source = settings.sasl_password, _var("sasl_password")
    if not password:
        raise KafkaSecurityError(f"SASL needs a password: {source} is empty")
    return password


def resolve(settings: KafkaSettings) -> KafkaSecurity:
    """Validate the security settings; raises KafkaSecurityError naming the variable at fault."""
    protocol = settings.security_protocol.strip().upper()
    if protocol not in PROTOCOLS:
        raise KafkaSecurityError(
            f"{_var('security_protocol')}={settings.security_protocol!r} is not one of "
            f"{', '.join(PROTOCOLS)}"
        )
    tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
    stray = [
        _var(name)
        for name, used in [
            ("ssl_ca_file", tls),
            ("ssl_cert_file", tls),
            ("ssl_key_file", tls),
            ("sasl_mechanism", sasl),
            ("sasl_username", sasl),
            ("sasl_password", sasl),
            ("sasl_password_file", sasl),
        ]
        if getattr(settings, name) and not used
    ]
    if stray:
        raise KafkaSecurityError(
            f"{', '.join(stray)} set, but {_var('security_protocol')}={protocol} does not use "
            "them (set SSL, SASL_PLAINTEXT or SASL_SSL, or unset them)"
        )
    out = KafkaSecurity(protocol=protocol)
    if tls:
        if bool(settings.ssl_cert_file) != bool(settings.ssl_key_file):
            raise KafkaSecurityError(
                f"{_var('ssl_cert_file')} and {_var('ssl_key_file')} go together (mutual TLS)"
            )
        out = dataclasses.replace(
            out,
            **{
                name.removeprefix("ssl_"): _readable_file(settings, name)
                for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file")
                if getattr(settings, name)
            },
        )
    if sasl:
        mechanism = settings.sasl_mechanism.strip().upper()
        if mechanism not in MECHANISMS:
            raise KafkaSecurityError(
                f"{_var('sasl_mechanism')}={settings.sasl_mechanism!r} is not one of "
                f"{', '.join(MECHANISMS)}"
            )
        if not settings.sasl_username:
            raise KafkaSecurityError(f"SASL needs a user: {_var('sasl_username')} is empty")
        out = dataclasses.replace(
            out, mechanism=mechanism, username=settings.sasl_username, password=_password(settings)
        )
        if mechanism == "PLAIN" and not tls:
            log.warning("Kafka SASL PLAIN without TLS sends the password in clear text")
    return out


def kafka_client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
    sec = resolve(settings)
    kwargs: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.tls:
        kwargs |= {
            "ssl_cafile": sec.ca_file,  # None: the system's trusted CAs
            "ssl_certfile": sec.cert_file,
            "ssl_keyfile": sec.key_file,
            "ssl_check_hostname": True,
        }
    if sec.sasl:
        kwargs |= {
            "sasl_mechanism": sec.mechanism,
            "sasl_plain_username": sec.username,
            "sasl_plain_password": sec.password,
        }
    return kwargs


def librdkafka_config(settings: KafkaSettings) -> dict[str, str]:
    """The same options as librdkafka (confluent-kafka) configuration properties."""
    sec = resolve(settings)
    config = {"security.protocol": sec.protocol.lower()}
    if sec.tls:
        config["ssl.endpoint.identification.algorithm"] = "https"
        for key, value in [
            ("ssl.ca.location", sec.ca_file),
            ("ssl.certificate.location", sec.cert_file),
            ("ssl.key.location", sec.key_file),
        ]:
            if value:
                config[key] = value
    if sec.sasl:
        assert sec.mechanism and sec.username and sec.password
        config |= {
            "sasl.mechanism": sec.mechanism,
            "sasl.username": sec.username,
            "sasl.password": sec.password,
        }
    return config
