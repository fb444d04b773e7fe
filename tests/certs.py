"""Throwaway certificates for TLS tests, made with the openssl command line (the `cryptography`
package is not a dependency): two CAs, and ECDSA P-256 certificates for 127.0.0.1 / localhost
that serve and authenticate as clients, like the cert-manager Certificates of the deployment."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    def env(self, ca: Path) -> dict[str, str]:
        """The PROLIF_TLS_* variables of a service with this identity that trusts `ca`."""
        return {
            "PROLIF_TLS_CERT_FILE": str(self.cert),
            "PROLIF_TLS_KEY_FILE": str(self.key),
            "PROLIF_TLS_CA_FILE": str(ca),
        }


@dataclass(frozen=True)
class PKI:
    ca: Path  # the deployment's CA
    server: Identity  # signed by `ca`
    client: Identity  # signed by `ca`
    other_ca: Path  # an unrelated CA
    stranger: Identity  # signed by `other_ca`


def _openssl(cwd: Path, *args: str) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is required for the TLS tests"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(cwd: Path, name: str) -> None:
    _openssl(cwd, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")


def _ca(cwd: Path, name: str) -> Path:
    _key(cwd, name)
    _openssl(
        cwd, "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
        "-days", "2", "-out", f"{name}.crt",
    )  # fmt: skip
    return cwd / f"{name}.crt"


def _issue(cwd: Path, name: str, ca: str) -> Identity:
    _key(cwd, name)
    _openssl(
        cwd, "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr"
    )
    (cwd / f"{name}.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n"
    )
    _openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
    )  # fmt: skip
    return Identity(cwd / f"{name}.crt", cwd / f"{name}.key")


def make_pki(cwd: Path) -> PKI:
    cwd.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(cwd, "ca"), _ca(cwd, "other-ca")
    return PKI(
        ca=ca,
        server=_issue(cwd, "server", "ca"),
        client=_issue(cwd, "client", "ca"),
        other_ca=other,
        stranger=_issue(cwd, "stranger", "other-ca"),
    )
