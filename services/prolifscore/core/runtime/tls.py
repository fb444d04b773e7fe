"""gRPC transport security from the PROLIF_TLS_* settings: one rule for every server the
services run and every channel the project opens (scoring -> model server, CLI, health checks).

- Server: no certificate = plaintext; PROLIF_TLS_CERT_FILE + PROLIF_TLS_KEY_FILE = TLS; with
  PROLIF_TLS_CA_FILE as well = mutual TLS: a client must present a certificate that CA signed,
  or its handshake fails (the client sees UNAVAILABLE) before any method runs.
- Channel: no CA = plaintext; PROLIF_TLS_CA_FILE = TLS that verifies the server against that CA
  (the name dialled must be in the server certificate's subjectAltName), presenting
  PROLIF_TLS_CERT_FILE / PROLIF_TLS_KEY_FILE when they are set.

The files are read once, when the server starts or the channel opens (a rotated certificate
takes a restart).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc

from prolifscore.core.runtime.tracing_grpc import traced_channel


class TLSFiles(Protocol):
    """The three settings (`RuntimeSettings` has them)."""

    @property
    def tls_cert_file(self) -> str: ...

    @property
    def tls_key_file(self) -> str: ...

    @property
    def tls_ca_file(self) -> str: ...


class TLSConfigError(ValueError):
    """The TLS settings cannot work together, or a file cannot be read."""


def _read(var: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{var}={path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{var}={path} is not a PEM file")
    return data


def _pair(files: TLSFiles) -> tuple[bytes, bytes] | None:
    """(key, certificate) of this service, or None when neither is set."""
    if not files.tls_cert_file and not files.tls_key_file:
        return None
    if not (files.tls_cert_file and files.tls_key_file):
        raise TLSConfigError("PROLIF_TLS_CERT_FILE and PROLIF_TLS_KEY_FILE must be set together")
    return (
        _read("PROLIF_TLS_KEY_FILE", files.tls_key_file),
        _read("PROLIF_TLS_CERT_FILE", files.tls_cert_file),
    )


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None for a plaintext port."""
    pair = _pair(files)
    if pair is None:
        if files.tls_ca_file:
            raise TLSConfigError(
                "PROLIF_TLS_CA_FILE is set but PROLIF_TLS_CERT_FILE / PROLIF_TLS_KEY_FILE are "
                "not: a server can only require client certificates over TLS"
            )
        return None
    ca = _read("PROLIF_TLS_CA_FILE", files.tls_ca_file) if files.tls_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials | None:
    """Credentials for an outgoing channel, or None for plaintext (no CA set)."""
    if not files.tls_ca_file:
        return None
    ca = _read("PROLIF_TLS_CA_FILE", files.tls_ca_file)
    key, cert = _pair(files) or (None, None)
    return grpc.ssl_channel_credentials(ca, key, cert)


def open_channel(
    address: str, files: TLSFiles | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to `address`: TLS (mutual when this side has a certificate) when `files`
    names a CA, else plaintext; sending the trace context of its calls while tracing is on."""
    creds = channel_credentials(files) if files is not None else None
    if creds is None:
        return traced_channel(grpc.insecure_channel(address, options=list(options)))
    return traced_channel(grpc.secure_channel(address, creds, options=list(options)))
