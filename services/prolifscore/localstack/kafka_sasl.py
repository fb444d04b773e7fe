"""Server side of SASL PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802, RFC 7677) for Kafka.

Used by the Kafka gateway (kafka_gateway.py) because the embedded broker cannot authenticate
clients itself. Passwords are turned into SCRAM credentials and a PBKDF2 hash when the user
store is built and are not kept; an unknown user goes through the same steps as a wrong password
(a stable fake salt), so the replies do not tell which user names exist.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

PLAIN = "PLAIN"
SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_512 = "SCRAM-SHA-512"
MECHANISMS = (PLAIN, SCRAM_SHA_256, SCRAM_SHA_512)
SCRAM_ITERATIONS = 4096  # Kafka's minimum for SCRAM credentials
_HASH = {SCRAM_SHA_256: "sha256", SCRAM_SHA_512: "sha512"}
_PLAIN_HASH = "sha256"


class SaslFailure(Exception):
    """Authentication failed. `detail` is for the gateway's log; the client gets a generic text."""

    def __init__(self, mechanism: str, detail: str, user: str | None = None) -> None:
        super().__init__(detail)
        self.mechanism = mechanism
        self.detail = detail
        self.user = user

    @property
    def client_message(self) -> str:
        return f"Authentication failed: invalid credentials with SASL mechanism {self.mechanism}"


@dataclasses.dataclass(frozen=True)
class ScramCredential:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def scram_credential(
    mechanism: str, password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS
) -> ScramCredential:
    """StoredKey and ServerKey of RFC 5802 section 3 for `password`."""
    name = _HASH[mechanism]
    salted = hashlib.pbkdf2_hmac(name, password.encode("utf-8"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", name)
    return ScramCredential(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.new(name, client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", name),
    )


class UserStore:
    """SASL users: a PBKDF2 hash for PLAIN and SCRAM credentials per user; no passwords kept."""

    def __init__(self, users: Mapping[str, str], iterations: int = SCRAM_ITERATIONS) -> None:
        if not users:
            raise ValueError("SASL needs at least one user")
        self.iterations = iterations
        self._secret = secrets.token_bytes(32)  # derives fake salts for unknown users
        self._plain: dict[str, tuple[bytes, bytes]] = {}
        self._scram: dict[tuple[str, str], ScramCredential] = {}
        for user, password in users.items():
            if not user or not password:
                raise ValueError(f"SASL user {user!r} needs a non-empty name and password")
            salt = os.urandom(16)
            self._plain[user] = (salt, self._plain_hash(password, salt))
            for mech in _HASH:
                self._scram[(mech, user)] = scram_credential(
                    mech, password, os.urandom(16), iterations
                )

    def __contains__(self, user: object) -> bool:
        return user in self._plain

    def _plain_hash(self, password: str, salt: bytes) -> bytes:
        return hashlib.pbkdf2_hmac(_PLAIN_HASH, password.encode("utf-8"), salt, self.iterations)

    def check_plain(self, user: str, password: str) -> bool:
        """Constant-time check; an unknown user costs the same PBKDF2 as a known one."""
        salt, expected = self._plain.get(user, (self._secret[:16], b""))
        ok = hmac.compare_digest(self._plain_hash(password, salt), expected)
        return ok and user in self._plain

    def scram(self, mechanism: str, user: str) -> ScramCredential | None:
        return self._scram.get((mechanism, user))

    def fake_salt(self, mechanism: str, user: str) -> bytes:
        """The same salt on every attempt for a user that does not exist."""
        return hmac.digest(self._secret, f"{mechanism}\0{user}".encode(), "sha256")[:16]


def load_users(path: Path | str) -> dict[str, str]:
    """Read `user:password` lines (the first colon splits; `#` comments and blank lines skipped).

    Warns when others may read the file, since it holds passwords.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("SASL users file is readable by group or others", extra={"path": str(path)})
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{path}:{number}: expected user:password")
        users[user.strip()] = password
    if not users:
        raise ValueError(f"{path}: no users")
    return users


class SaslServer(Protocol):
    """One authentication exchange: feed client tokens until `done`."""

    mechanism: str
    done: bool
    user: str | None

    def step(self, token: bytes) -> bytes:
        """Consume a client token, return the server's answer; raises SaslFailure."""
        ...


def new_server(mechanism: str, users: UserStore) -> SaslServer:
    if mechanism == PLAIN:
        return PlainServer(users)
    if mechanism in _HASH:
        return ScramServer(mechanism, users)
    raise ValueError(f"unsupported SASL mechanism {mechanism!r}")


class PlainServer:
    """RFC 4616: one message `authzid NUL authcid NUL passwd`, answered with nothing."""

    mechanism = PLAIN

    def __init__(self, users: UserStore) -> None:
        self._users = users
        self.done = False
        self.user: str | None = None

    def step(self, token: bytes) -> bytes:
        parts = token.split(b"\0")
        if self.done or len(parts) != 3:
            raise SaslFailure(PLAIN, "malformed PLAIN message")
        try:
            authzid, user, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise SaslFailure(PLAIN, "PLAIN message is not UTF-8") from None
        if authzid and authzid != user:
            raise SaslFailure(PLAIN, "authorization id differs from the user", user)
        if not self._users.check_plain(user, password):
            known = user in self._users
            raise SaslFailure(PLAIN, "wrong password" if known else "unknown user", user)
        self.done, self.user = True, user
        return b""


def _attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        key, sep, value = part.partition("=")
        if not (sep and key):
            raise ValueError(f"malformed attribute {part[:20]!r}")
        out.append((key, value))
    return out


def _saslname(value: str) -> str:
    """RFC 5802 section 5.1: `=2C` is a comma and `=3D` an equals sign; any other `=` is bad."""
    if value.replace("=2C", "").replace("=3D", "").count("="):
        raise ValueError("bad escape in user name")
    return value.replace("=2C", ",").replace("=3D", "=")


class ScramServer:
    """RFC 5802 server: client-first -> server-first, client-final -> server-final.

    No channel binding (like Kafka): a client asking for it (`p=`) is refused, and so is an
    authorization id other than the user or the delegation-token extension (`tokenauth`).
    """

    def __init__(self, mechanism: str, users: UserStore, nonce: str | None = None) -> None:
        self.mechanism = mechanism
        self._users = users
        self._hash = _HASH[mechanism]
        self._server_nonce = nonce or secrets.token_urlsafe(18)
        self._state = "first"
        self._first_bare = self._server_first = self._gs2 = self._nonce = ""
        self._cred: ScramCredential | None = None
        self._login: str | None = None
        self.done = False
        self.user: str | None = None

    def _fail(self, detail: str) -> SaslFailure:
        self._state = "failed"
        return SaslFailure(self.mechanism, detail, self._login)

    def step(self, token: bytes) -> bytes:
        try:
            message = token.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail("SCRAM message is not UTF-8") from None
        try:
            if self._state == "first":
                return self._client_first(message).encode("utf-8")
            if self._state == "final":
                return self._client_final(message).encode("utf-8")
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        raise self._fail(f"unexpected SCRAM message in state {self._state}")

    def _client_first(self, message: str) -> str:
        flag, sep, rest = message.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep and sep2) or flag not in ("n", "y"):
            bad = "channel binding is not supported" if flag.startswith("p=") else "bad header"
            raise ValueError(bad)
        attrs = _attributes(bare)
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise ValueError("client-first-message needs n= and r=")
        self._login = user = _saslname(attrs[0][1])
        if authzid and _saslname(authzid.removeprefix("a=")) != user:
            raise ValueError("authorization id differs from the user")
        if any(k == "tokenauth" for k, _ in attrs[2:]):
            raise ValueError("delegation tokens are not supported")
        self._gs2 = f"{flag},{authzid},"
        self._nonce = attrs[1][1] + self._server_nonce
        self._first_bare = bare
        self._cred = self._users.scram(self.mechanism, user)
        salt = self._cred.salt if self._cred else self._users.fake_salt(self.mechanism, user)
        iterations = self._cred.iterations if self._cred else self._users.iterations
        salt64 = base64.b64encode(salt).decode()
        self._server_first = f"r={self._nonce},s={salt64},i={iterations}"
        self._state = "final"
        return self._server_first

    def _client_final(self, message: str) -> str:
        without_proof, sep, proof64 = message.rpartition(",p=")
        attrs = _attributes(without_proof) if sep else []
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ValueError("client-final-message needs c=, r= and p=")
        if base64.b64decode(attrs[0][1], validate=True) != self._gs2.encode("utf-8"):
            raise ValueError("channel binding data does not match the header")
        if attrs[1][1] != self._nonce:
            raise ValueError("nonce mismatch")
        proof = base64.b64decode(proof64, validate=True)
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        if self._cred is None:
            raise ValueError("unknown user")
        signature = hmac.digest(self._cred.stored_key, auth_message, self._hash)
        if len(proof) != len(signature):
            raise ValueError("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        stored_key = hashlib.new(self._hash, client_key).digest()
        if not hmac.compare_digest(stored_key, self._cred.stored_key):
            raise ValueError("wrong password")
        server_signature = hmac.digest(self._cred.server_key, auth_message, self._hash)
        self._state, self.done, self.user = "done", True, self._login
        return "v=" + base64.b64encode(server_signature).decode()
