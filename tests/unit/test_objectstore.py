"""The broker's file-backed object store: the S3 calls Tansu makes, answered as S3 does, and
kept on disk across restarts of the store."""

from __future__ import annotations

import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from prolifscore.localstack.objectstore import ObjectStoreServer

NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ObjectStoreServer]:
    server = ObjectStoreServer(tmp_path / "s3").start()
    yield server
    server.stop()


def call(
    server: ObjectStoreServer, method: str, path: str, body: bytes | None = None, **headers: str
):
    request = urllib.request.Request(
        server.endpoint + path, data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def keys(body: bytes) -> list[str]:
    root = ET.fromstring(body)
    return [k.text or "" for k in root.findall("s3:Contents/s3:Key", NS)]


def test_conditional_writes_are_honoured(store: ObjectStoreServer) -> None:
    assert call(store, "PUT", "/b")[0] == 200
    status, headers, _ = call(store, "PUT", "/b/a/meta.json", b"v1", **{"If-None-Match": "*"})
    assert status == 200 and headers["ETag"].startswith('"')
    first = headers["ETag"]
    # create-only write of an existing key fails; update with a stale ETag fails
    assert call(store, "PUT", "/b/a/meta.json", b"v2", **{"If-None-Match": "*"})[0] == 412
    assert call(store, "PUT", "/b/a/meta.json", b"v2", **{"If-Match": '"stale"'})[0] == 412
    status, headers, _ = call(store, "PUT", "/b/a/meta.json", b"v2", **{"If-Match": first})
    assert status == 200 and headers["ETag"] != first
    status, headers, body = call(store, "GET", "/b/a/meta.json")
    assert (status, body) == (200, b"v2")
    assert call(store, "GET", "/b/a/meta.json", **{"If-None-Match": headers["ETag"]})[0] == 304
    assert call(store, "GET", "/b/a/missing.json")[0] == 404
    assert call(store, "GET", "/nobucket/x")[0] == 404


def test_list_objects_v2_by_prefix_delimiter_and_pages(store: ObjectStoreServer) -> None:
    call(store, "PUT", "/b")
    for key in ("t/p0/r/0001.batch", "t/p0/r/0002.batch", "t/p1/r/0001.batch", "t/p0/w.json"):
        assert call(store, "PUT", f"/b/{key}", key.encode())[0] == 200
    status, _, body = call(store, "GET", "/b?list-type=2&prefix=t/p0/r/")
    assert status == 200 and keys(body) == ["t/p0/r/0001.batch", "t/p0/r/0002.batch"]
    _, _, body = call(store, "GET", "/b?list-type=2&prefix=t/&delimiter=/")
    prefixes = [p.text for p in ET.fromstring(body).findall("s3:CommonPrefixes/s3:Prefix", NS)]
    assert prefixes == ["t/p0/", "t/p1/"] and keys(body) == []
    seen, token = [], ""
    while True:
        query = "/b?list-type=2&max-keys=1" + (f"&continuation-token={token}" if token else "")
        root = ET.fromstring(call(store, "GET", query)[2])
        seen += [k.text for k in root.findall("s3:Contents/s3:Key", NS)]
        token = root.findtext("s3:NextContinuationToken", default="", namespaces=NS)
        if root.findtext("s3:IsTruncated", namespaces=NS) != "true":
            break
    assert seen == sorted(
        ["t/p0/r/0001.batch", "t/p0/r/0002.batch", "t/p1/r/0001.batch", "t/p0/w.json"]
    )


def test_objects_survive_a_restart_and_keys_cannot_escape(tmp_path: Path) -> None:
    server = ObjectStoreServer(tmp_path / "s3").start()
    call(server, "PUT", "/b")
    call(server, "PUT", "/b/k/v.json", b"kept")
    for bad in ("/b/../outside", "/b/k/%2e%2e/%2e%2e/x", "/b/a//b"):
        assert call(server, "PUT", bad, b"x")[0] in (400, 404)
    server.stop()
    assert not (tmp_path / "outside").exists()
    again = ObjectStoreServer(tmp_path / "s3").start()
    try:
        assert call(again, "GET", "/b/k/v.json")[2] == b"kept"
        assert call(again, "POST", "/b/k/v.json?uploads")[0] == 501  # multipart: said, not faked
    finally:
        again.stop()
