"""TFRecord shards of uint8 tiles, written and read without importing TensorFlow.

Record framing: uint64 length, masked CRC32C of the length, data, masked CRC32C of the data
(the format tf.data.TFRecordDataset reads). Records are tf.train.Example protos built from
the wire-compatible copy in protos/prolifscore/v1/tf_example.proto.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from prolifscore.core.wsi.leftovers import open_locked, remove_stale_temporaries_of, temporary_for
from prolifscore.v1 import tf_example_pb2 as tfx

_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class CorruptRecord(ValueError):
    pass


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    return _mask(google_crc32c.value(data))


def _write_all(f: BinaryIO, pieces: Sequence[bytes]) -> None:
    """os.writev of all pieces, resuming after a short write."""
    views = [memoryview(p) for p in pieces if p]
    fd = f.fileno()
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def frame(data: bytes) -> bytes:
    header = _LEN.pack(len(data))
    return header + _CRC.pack(_masked_crc(header)) + data + _CRC.pack(_masked_crc(data))


def read_records(path: str | os.PathLike[str], verify: bool = True) -> Iterator[bytes]:
    """Yield each record's bytes; raise CorruptRecord on a bad checksum or truncation."""
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if not header:
                return
            crc = f.read(4)
            if len(header) < 8 or len(crc) < 4:
                raise CorruptRecord(f"{path}: truncated record header")
            if verify and _CRC.unpack(crc)[0] != _masked_crc(header):
                raise CorruptRecord(f"{path}: length checksum mismatch")
            (length,) = _LEN.unpack(header)
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                raise CorruptRecord(f"{path}: truncated record")
            if verify and _CRC.unpack(crc)[0] != _masked_crc(data):
                raise CorruptRecord(f"{path}: data checksum mismatch")
            yield data


WRITEBACK_BYTES = 1 << 20


def _writeback_starter() -> Callable[[int, int, int], None]:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a file range to disk
    without waiting, so that the shard's fsync at commit finds most pages already written
    instead of writing the whole shard then (~30 ms per 12 MiB shard here). A no-op where
    unavailable; durability never depends on it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors: fsync still follows

    return start


_start_writeback = _writeback_starter()


class AtomicShardWriter:
    """Stream records into a temp file next to `path`; `commit()` fsyncs and renames it into
    place, so a shard is either complete or absent. Re-writing the same path replaces it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries_of(path)  # a writer of this shard that died left them
        self._tmp = temporary_for(path)
        # Unbuffered: each record goes out in one writev of its pieces. Locked while open, so
        # no one takes it for a dead writer's leftover (leftovers.py).
        self._f: BinaryIO = open_locked(self._tmp, buffering=0)
        self._crc = google_crc32c.Checksum()
        self.count = 0
        self.size = 0
        self._flushed = 0  # bytes handed to early writeback

    def write(self, record: bytes | Sequence[bytes]) -> None:
        """Append one record: its bytes, or its bytes in pieces (`tile_example_parts`), which
        are framed and written without joining them (no copy of the pixels)."""
        parts = (record,) if isinstance(record, bytes) else tuple(record)
        length = sum(len(p) for p in parts)
        header = _LEN.pack(length)
        crc = 0
        for p in parts:
            crc = google_crc32c.extend(crc, p)
        pieces = (header + _CRC.pack(_masked_crc(header)), *parts, _CRC.pack(_mask(crc)))
        for p in pieces:
            self._crc.update(p)
        _write_all(self._f, pieces)
        self.count += 1
        self.size += length + 16
        if self.size - self._flushed >= WRITEBACK_BYTES:
            _start_writeback(self._f.fileno(), self._flushed, self.size - self._flushed)
            self._flushed = self.size

    @property
    def crc32c(self) -> str:
        """Checksum of the whole shard file (sha256 cost ~8x more per tile than CRC32C)."""
        return self._crc.hexdigest().decode()

    def commit(self) -> None:
        """Durable, then visible: fsync the data, rename, fsync the folder. (Early writeback
        in `write` only means less is left for this fsync to wait for.)"""
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or not self._f.closed:
            self.abort()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Small files (manifests, batch markers): temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(path)
    with open_locked(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _ONE_BYTE[n]
    n &= 0xFFFFFFFFFFFFFFFF  # int64 as protobuf writes it: negatives in 10 bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, length: int) -> bytes:
    """Key and length prefix of a length-delimited field (wire type 2) number `tag`."""
    return _varint(tag << 3 | 2) + _varint(length)


@functools.lru_cache(maxsize=256)
def _entry(key: str, kind: int, n: int) -> tuple[bytes, int]:
    """Head of one `Features.feature` map entry whose list payload is `n` bytes long (the
    payload itself not included), and the entry's total size. Depends on the key, the kind
    and the payload's length only, hence cached: the same few heads serve every tile.

    Entry {1: key, 2: Feature {kind: List {1: payload}}}; kind 1 bytes_list, 2 float_list,
    3 int64_list.
    """
    k = key.encode()
    lst = _field(1, n)
    feat = _field(kind, len(lst) + n)
    body = b"\n" + _varint(len(k)) + k + _field(2, len(feat) + len(lst) + n) + feat + lst
    head = _field(1, len(body) + n)  # Features.feature = 1
    return head + body, len(head) + len(body) + n


def _small(key: str, kind: int, payload: bytes) -> bytes:
    return _entry(key, kind, len(payload))[0] + payload


def _int(key: str, value: int) -> bytes:
    return _small(key, 3, _varint(value))


def _float(key: str, value: float) -> bytes:
    return _small(key, 2, _F32.pack(value))


def _str(key: str, value: str) -> bytes:
    return _small(key, 1, value.encode())


_F32 = struct.Struct("<f")


@dataclass(frozen=True)
class TileLabels:
    """What every record of a shard shares: the slide, the spec its tiles were cut with, and its
    labels and split. Unknown labels: tumor_score -1, molecular_score NaN."""

    slide_id: str
    spec_hash: str
    level: int
    split: str
    tumor_score: int = -1
    molecular_score: float = math.nan


@dataclass(frozen=True, eq=False)
class TileRecord:
    """One tile of a shard: uint8 HWC pixels, grid cell, level-0 origin and tissue fraction."""

    image: np.ndarray
    col: int
    row: int
    x: int
    y: int
    tissue: float


def tile_example_parts(tile: TileRecord, labels: TileLabels) -> tuple[bytes, bytes, bytes]:
    """`tile_example` as (head, pixels, tail): concatenated, the serialized Example.

    Encoded by hand (the wire format of tf.train.Example, one value per feature, packed
    numbers, as protobuf writes them): the protobuf runtime copies the pixels twice and costs
    ~1 ms per 256 px tile in Python; here the pixels are copied once (`tobytes`) and the
    shard writer frames and writes the pieces without joining them.
    """
    h, w, c = tile.image.shape
    pixels = np.ascontiguousarray(tile.image, dtype=np.uint8).tobytes()
    image_head, image_size = _entry("image", 1, len(pixels))
    tail = b"".join(
        (
            _int("height", h),
            _int("width", w),
            _int("channels", c),
            _str("slide_id", labels.slide_id),
            _int("col", tile.col),
            _int("row", tile.row),
            _int("x", tile.x),
            _int("y", tile.y),
            _int("level", labels.level),
            _int("tumor_score", labels.tumor_score),
            _float("molecular_score", labels.molecular_score),
            _str("split", labels.split),
            _str("spec_hash", labels.spec_hash),
            _float("tissue", tile.tissue),
        )
    )
    head = _field(1, image_size + len(tail)) + image_head  # Example.features = 1
    return head, pixels, tail


def tile_example(tile: TileRecord, labels: TileLabels) -> bytes:
    """One tile as a serialized tf.train.Example. `image` holds raw uint8 HWC bytes (no codec:
    8x smaller than the reference study's float64 vectors, nothing to decode at training
    time)."""
    return b"".join(tile_example_parts(tile, labels))


def parse_tile_example(data: bytes) -> dict[str, object]:
    """Inverse of tile_example (for tests, tools and the non-TF readers)."""
    ex = tfx.Example.FromString(data)
    out: dict[str, object] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        values = list(getattr(feat, kind).value)
        out[key] = values[0] if len(values) == 1 else values
    for key in ("slide_id", "split", "spec_hash"):
        out[key] = out[key].decode()  # type: ignore[union-attr]
    h, w, c = (int(out[k]) for k in ("height", "width", "channels"))  # type: ignore[call-overload]
    out["image"] = np.frombuffer(out["image"], np.uint8).reshape(h, w, c)  # type: ignore[arg-type]
    return out
