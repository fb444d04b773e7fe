"""A file-backed object store speaking the subset of the S3 API that the embedded broker uses.

Tansu (the embedded Kafka-compatible broker) keeps its topics, records, consumer groups and
offsets either in memory (lost when it stops) or in S3. No S3 server is obtainable here, so this
one stores objects as files under a folder: the broker then keeps its work across restarts of
itself, of this store and of the machine.

Served: create bucket, list buckets, PUT (with S3's conditional writes `If-None-Match: *` and
`If-Match: <etag>`, which Tansu relies on for consistency), GET, HEAD, DELETE and
ListObjectsV2 (prefix, delimiter, continuation). Anything else answers 501 with an S3 error body,
so an unsupported call shows up in the broker's log instead of passing silently. Requests are not
authenticated: the store binds 127.0.0.1 and is meant for one local broker only.

    python -m prolifscore.localstack.objectstore --root DIR [--port N]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
import time
import urllib.parse
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

from prolifscore.core.wsi.tfrecord import write_atomic

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_MAX_KEYS = 1000
_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class _KeyError(ValueError):
    """A bucket or key that cannot name a file under the root."""


def _iso(mtime: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))


class FileStore:
    """Objects as files: `<root>/<bucket>/objects/<key>`, their ETags in `<bucket>/etags/<key>`.

    Writes go to a temporary file that is fsynced and renamed over the object, then the ETag, so
    a crash leaves either the old or the new object. One lock serialises conditional writes.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _bucket(self, bucket: str) -> Path:
        if not bucket or bucket in (".", "..") or "/" in bucket or "\0" in bucket:
            raise _KeyError(f"invalid bucket name {bucket!r}")
        return self.root / bucket

    def _paths(self, bucket: str, key: str) -> tuple[Path, Path]:
        parts = key.split("/")
        if not key or "\0" in key or any(p in ("", ".", "..") for p in parts):
            raise _KeyError(f"invalid object key {key!r}")
        base = self._bucket(bucket)
        return base / "objects" / key, base / "etags" / key

    def buckets(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def create_bucket(self, bucket: str) -> None:
        for sub in ("objects", "etags"):
            (self._bucket(bucket) / sub).mkdir(parents=True, exist_ok=True)

    def bucket_exists(self, bucket: str) -> bool:
        return (self._bucket(bucket) / "objects").is_dir()

    def etag(self, bucket: str, key: str) -> str | None:
        obj, tag = self._paths(bucket, key)
        if not obj.is_file():
            return None
        try:
            return tag.read_text()
        except FileNotFoundError:  # written before its tag (crash in between): recompute
            return f'"{hashlib.md5(obj.read_bytes()).hexdigest()}"'

    def put(
        self, bucket: str, key: str, data: bytes, if_match: str | None, if_none: str | None
    ) -> str:
        """Store `data`; the new ETag. Raises FileExistsError when a condition fails."""
        obj, tag = self._paths(bucket, key)
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        with self.lock:
            current = self.etag(bucket, key)
            if if_none == "*" and current is not None:
                raise FileExistsError(key)
            if if_match is not None and if_match not in ("*", current):
                raise FileExistsError(key)
            if if_match == "*" and current is None:
                raise FileExistsError(key)
            write_atomic(obj, data)
            write_atomic(tag, etag.encode())
        return etag

    def get(self, bucket: str, key: str) -> tuple[bytes, str, float] | None:
        obj, _ = self._paths(bucket, key)
        with self.lock:
            etag = self.etag(bucket, key)
            if etag is None:
                return None
            return obj.read_bytes(), etag, obj.stat().st_mtime

    def delete(self, bucket: str, key: str) -> None:
        obj, tag = self._paths(bucket, key)
        with self.lock:
            for path in (obj, tag):
                path.unlink(missing_ok=True)

    def list(self, bucket: str, prefix: str) -> list[tuple[str, int, float, str]]:
        """(key, size, mtime, etag) of every object whose key starts with `prefix`, sorted."""
        base = self._bucket(bucket) / "objects"
        start = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        out = []
        if start.is_dir():
            for path in start.rglob("*"):
                key = path.relative_to(base).as_posix()
                if path.is_file() and key.startswith(prefix):
                    stat = path.stat()
                    out.append((key, stat.st_size, stat.st_mtime, self.etag(bucket, key) or ""))
        return sorted(out)


def _list_xml(bucket: str, prefix: str, query: dict[str, str], entries: list) -> bytes:
    """ListObjectsV2 result: keys after the continuation token, folded by the delimiter."""
    delimiter = query.get("delimiter", "")
    after = query.get("continuation-token") or query.get("start-after") or ""
    limit = min(int(query.get("max-keys", _MAX_KEYS)), _MAX_KEYS)
    contents, prefixes, last = [], [], ""
    for key, size, mtime, etag in entries:
        if key <= after:
            continue
        if delimiter and delimiter in key[len(prefix) :]:
            folded = key[: key.index(delimiter, len(prefix)) + len(delimiter)]
            if folded in prefixes or folded <= after:
                continue
            prefixes.append(folded)
        else:
            contents.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(mtime)}</LastModified>"
                f"<ETag>{escape(etag)}</ETag><Size>{size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        last = prefixes[-1] if prefixes and prefixes[-1] > key else key
        if len(contents) + len(prefixes) >= limit:
            break
    truncated = bool(last) and any(k > last and not k.startswith(last) for k, *_ in entries)
    token = f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_S3_NS}">'
        f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
        f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>{limit}</MaxKeys>"
        f"<IsTruncated>{str(truncated).lower()}</IsTruncated>{token}{''.join(contents)}"
        + "".join(
            f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
        )
        + "</ListBucketResult>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    server: ObjectStoreServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("s3 %s", fmt % args)

    def _target(self) -> tuple[str, str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key, dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>".encode()
        self._send(status, body, {"Content-Type": "application/xml"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        store = self.server.store
        try:
            bucket, key, query = self._target()
            if not bucket:
                if self.command != "GET":
                    return self._error(405, "MethodNotAllowed", self.command)
                names = "".join(
                    f"<Bucket><Name>{escape(b)}</Name></Bucket>" for b in store.buckets()
                )
                body = (
                    f'<ListAllMyBucketsResult xmlns="{_S3_NS}"><Buckets>{names}</Buckets>'
                    "</ListAllMyBucketsResult>"
                )
                return self._send(200, body.encode(), {"Content-Type": "application/xml"})
            if not key:
                return self._bucket_request(bucket, query)
            if (
                query.keys() & {"uploads", "uploadId", "partNumber"}
                or "x-amz-copy-source" in self.headers
            ):
                return self._error(
                    501, "NotImplemented", f"{self.command} {self.path} is not served"
                )
            return self._object_request(bucket, key)
        except _KeyError as exc:
            self._error(400, "InvalidArgument", str(exc))

    def _bucket_request(self, bucket: str, query: dict[str, str]) -> None:
        store = self.server.store
        if self.command == "PUT":
            store.create_bucket(bucket)
            return self._send(200)
        if not store.bucket_exists(bucket):
            return self._error(404, "NoSuchBucket", bucket)
        if self.command == "HEAD":
            return self._send(200)
        if self.command == "GET" and query.get("list-type") == "2":
            prefix = query.get("prefix", "")
            body = _list_xml(bucket, prefix, query, store.list(bucket, prefix))
            return self._send(200, body, {"Content-Type": "application/xml"})
        self._error(501, "NotImplemented", f"{self.command} on a bucket with {sorted(query)}")

    def _object_request(self, bucket: str, key: str) -> None:
        store = self.server.store
        if not store.bucket_exists(bucket):
            return self._error(404, "NoSuchBucket", bucket)
        if self.command == "PUT":
            data = self._body()
            try:
                etag = store.put(
                    bucket,
                    key,
                    data,
                    self.headers.get("If-Match"),
                    self.headers.get("If-None-Match"),
                )
            except FileExistsError:
                return self._error(412, "PreconditionFailed", f"condition failed for {key}")
            return self._send(200, b"", {"ETag": etag})
        if self.command == "DELETE":
            store.delete(bucket, key)
            return self._send(204)
        found = store.get(bucket, key)
        if found is None:
            return self._error(404, "NoSuchKey", key)
        data, etag, mtime = found
        if self.headers.get("If-None-Match") == etag:
            return self._send(304, b"", {"ETag": etag})
        if self.headers.get("If-Match") not in (None, "*", etag):
            return self._error(412, "PreconditionFailed", key)
        headers = {"ETag": etag, "Last-Modified": formatdate(mtime, usegmt=True)}
        headers["Content-Type"] = "application/octet-stream"
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = int(last) if first and last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers)
        self._send(200, data, headers)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _dispatch


class ObjectStoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, port: int = 0) -> None:
        self.store = FileStore(root)
        super().__init__((HOST, port), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def start(self) -> ObjectStoreServer:
        threading.Thread(target=self.serve_forever, name="objectstore", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prolifscore.localstack.objectstore")
    parser.add_argument("--root", type=Path, required=True, help="folder that holds the objects")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = ObjectStoreServer(args.root, args.port)
    print(f"object store ready: {server.endpoint} (root {server.store.root})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
