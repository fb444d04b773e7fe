"""Kafka wire frames the gateway must understand before a client is authenticated.

Only ApiVersions (relayed whole), SaslHandshake v0-v1 and SaslAuthenticate v0-v2 (answered by the
gateway) are parsed; SaslAuthenticate v2 is a flexible version (header v2, compact fields,
tagged fields). Everything after authentication is relayed without parsing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Sequence

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
HANDSHAKE_MAX_VERSION, AUTHENTICATE_MAX_VERSION = 1, 2  # what this gateway answers
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58
MAX_PREAUTH_FRAME = 512 * 1024  # Kafka's sasl.server.max.receive.size
_I16, _I32, _I64 = struct.Struct(">h"), struct.Struct(">i"), struct.Struct(">q")


class MalformedFrame(ValueError):
    pass


def _int(kind: struct.Struct, buf: bytes, off: int = 0) -> int:
    try:
        return int(kind.unpack_from(buf, off)[0])
    except struct.error:
        raise MalformedFrame("truncated request") from None


def _uvarint(buf: bytes, off: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if off >= len(buf) or shift > 28:
            raise MalformedFrame("bad varint")
        byte = buf[off]
        off += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, off
        shift += 7


def _put_uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _skip_tagged_fields(buf: bytes, off: int) -> int:
    count, off = _uvarint(buf, off)
    for _ in range(count):
        _, off = _uvarint(buf, off)
        size, off = _uvarint(buf, off)
        off += size
    return off


@dataclasses.dataclass(frozen=True)
class Request:
    api_key: int
    api_version: int
    correlation_id: int
    body: bytes


def parse_request(frame: bytes) -> Request:
    """Split a request into its header fields and body (header v2 for SaslAuthenticate v2)."""
    api_key, api_version = _int(_I16, frame), _int(_I16, frame, 2)
    correlation_id = _int(_I32, frame, 4)
    off = 10 + max(_int(_I16, frame, 8), 0)  # after the client id
    if api_key == SASL_AUTHENTICATE and api_version >= 2 and off <= len(frame):
        off = _skip_tagged_fields(frame, off)
    if off > len(frame):
        raise MalformedFrame("truncated request header")
    return Request(api_key, api_version, correlation_id, frame[off:])


def handshake_mechanism(req: Request) -> str:
    size = _int(_I16, req.body)
    if size < 0 or 2 + size > len(req.body):
        raise MalformedFrame("bad mechanism string")
    return req.body[2 : 2 + size].decode("utf-8", errors="replace")


def handshake_response(correlation_id: int, error: int, mechanisms: Sequence[str]) -> bytes:
    out = [_I32.pack(correlation_id), _I16.pack(error), _I32.pack(len(mechanisms))]
    for name in mechanisms:
        out += [_I16.pack(len(name)), name.encode()]
    return b"".join(out)


def authenticate_token(req: Request) -> bytes:
    if req.api_version >= 2:
        size, off = _uvarint(req.body, 0)
        size -= 1  # compact bytes: length + 1
    else:
        size, off = _int(_I32, req.body), 4
    if size < 0 or off + size > len(req.body):
        raise MalformedFrame("bad auth_bytes")
    return req.body[off : off + size]


def authenticate_response(
    version: int, correlation_id: int, error: int, message: str | None, token: bytes
) -> bytes:
    """SaslAuthenticateResponse v0-v2 (v2: flexible header and compact fields)."""
    text = None if message is None else message.encode("utf-8")
    if version >= 2:
        out = [_I32.pack(correlation_id), b"\0", _I16.pack(error)]
        out += [_put_uvarint(0 if text is None else len(text) + 1), text or b""]
        out += [_put_uvarint(len(token) + 1), token]
    else:
        out = [_I32.pack(correlation_id), _I16.pack(error)]
        out += [_I16.pack(-1 if text is None else len(text)), text or b""]
        out += [_I32.pack(len(token)), token]
    if version >= 1:
        out.append(_I64.pack(0))  # session lifetime 0: no re-authentication (KIP-368)
    if version >= 2:
        out.append(b"\0")
    return b"".join(out)


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One size-prefixed frame, or None at end of stream."""
    try:
        (size,) = _I32.unpack(await reader.readexactly(4))
    except asyncio.IncompleteReadError:
        return None
    if not 0 <= size <= limit:
        raise MalformedFrame(f"frame of {size} bytes before authentication")
    return await reader.readexactly(size)


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(_I32.pack(len(payload)) + payload)


def sasl_versions(host: str, port: int, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """The broker's (min, max) versions of SaslHandshake and SaslAuthenticate (ApiVersions v0)."""
    client_id = b"prolifscore-gateway"
    request = struct.pack(">hhih", API_VERSIONS, 0, 1, len(client_id)) + client_id
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(_I32.pack(len(request)) + request)
        with s.makefile("rb") as f:
            (size,) = _I32.unpack(f.read(4))
            data = f.read(size)
    _, error, count = struct.unpack_from(">ihi", data)
    if error:
        raise RuntimeError(f"ApiVersions failed with error {error}")
    keys = (struct.unpack_from(">hhh", data, 10 + 6 * i) for i in range(count))
    return {k: (lo, hi) for k, lo, hi in keys if k in (SASL_HANDSHAKE, SASL_AUTHENTICATE)}
