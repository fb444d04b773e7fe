"""How a record's bytes carry a protobuf message: binary protobuf or its JSON mapping, told apart
by the `content-type` header, so hand-written JSON and tools without the protos can take part."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf import message as pb_message

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CONTENT_TYPE = "content-type"

M = TypeVar("M", bound=pb_message.Message)

Headers = list[tuple[str, bytes]]


class DecodeError(Exception):
    """A record whose payload cannot be turned into the expected message (dead-letter it)."""


def header(headers: Iterable[tuple[str, Any]] | None, name: str) -> str | None:
    """The first header called `name` (case-insensitive), decoded as UTF-8, or None."""
    for key, value in headers or ():
        if key.lower() == name:
            if isinstance(value, bytes):
                return value.decode("utf-8", errors="replace")
            return None if value is None else str(value)
    return None


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`; missing means protobuf."""
    if not content_type or not content_type.strip():
        return PROTOBUF
    return content_type.split(";", 1)[0].strip().lower()


def encode(msg: pb_message.Message, content_type: str = PROTOBUF) -> tuple[bytes, Headers]:
    """Record value and headers for `msg`; the `content-type` header tells consumers the format."""
    kind = media_type(content_type)
    if kind == PROTOBUF:
        value = msg.SerializeToString()
    elif kind == JSON:
        value = json_format.MessageToJson(msg, indent=None, ensure_ascii=False).encode("utf-8")
    else:
        raise ValueError(f"unsupported content type {content_type!r} (use {PROTOBUF} or {JSON})")
    return value, [(CONTENT_TYPE, content_type.encode("utf-8"))]


def decode(value: bytes | None, headers: Iterable[tuple[str, Any]] | None, msg_type: type[M]) -> M:
    """Parse a record value as `msg_type`, protobuf binary or JSON mapping per `content-type`.

    JSON is parsed strictly (unknown fields are errors) since it is typed by hand or by tools;
    binary protobuf keeps unknown fields so newer producers stay readable.
    """
    content_type = header(headers, CONTENT_TYPE)
    kind = media_type(content_type)
    name = msg_type.DESCRIPTOR.full_name
    if not value:
        raise DecodeError(f"empty payload (expected {name})")
    if kind == PROTOBUF:
        try:
            return msg_type.FromString(bytes(value))
        except pb_message.DecodeError as exc:
            raise DecodeError(f"invalid protobuf for {name} ({len(value)} bytes): {exc}") from exc
    if kind == JSON:
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"JSON payload for {name} is not UTF-8: {exc}") from exc
        try:
            return json_format.Parse(text, msg_type())
        except json_format.ParseError as exc:
            raise DecodeError(f"invalid JSON for {name}: {exc}") from exc
    raise DecodeError(f"unsupported content-type {content_type!r} (expected {PROTOBUF} or {JSON})")
