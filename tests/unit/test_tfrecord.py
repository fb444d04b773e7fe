"""TFRecord shards: framing, atomic replacement, and that TensorFlow itself reads them."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from prolifscore.core.wsi.tfrecord import (
    AtomicShardWriter,
    CorruptRecord,
    TileLabels,
    TileRecord,
    parse_tile_example,
    read_records,
    tile_example,
    tile_example_parts,
)
from prolifscore.v1 import tf_example_pb2 as tfx


def _example(i: int) -> bytes:
    tile = TileRecord(np.full((8, 8, 3), i, np.uint8), col=i, row=2, x=i * 256, y=512, tissue=0.95)
    labels = TileLabels("s1", "abc", level=0, split="train", tumor_score=3, molecular_score=0.25)
    return tile_example(tile, labels)


def test_round_trip(tmp_path):
    path = tmp_path / "a.tfrecord"
    with AtomicShardWriter(path) as w:
        for i in range(3):
            w.write(_example(i))
        w.commit()
    parsed = [parse_tile_example(r) for r in read_records(path)]
    assert [p["col"] for p in parsed] == [0, 1, 2]
    assert parsed[1]["image"].shape == (8, 8, 3) and parsed[1]["image"][0, 0, 0] == 1
    assert parsed[0]["slide_id"] == "s1" and parsed[0]["tumor_score"] == 3


def test_failed_write_leaves_nothing_and_rewrite_replaces(tmp_path):
    path = tmp_path / "a.tfrecord"
    with pytest.raises(RuntimeError), AtomicShardWriter(path) as w:
        w.write(_example(0))
        raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []
    for n in (3, 2):
        with AtomicShardWriter(path) as w:
            for i in range(n):
                w.write(_example(i))
            w.commit()
    assert len(list(read_records(path))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.tfrecord"]


def test_corruption_detected(tmp_path):
    path = tmp_path / "a.tfrecord"
    with AtomicShardWriter(path) as w:
        w.write(_example(0))
        w.commit()
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord):
        list(read_records(path))
    path.write_bytes(bytes(data[:30]))
    with pytest.raises(CorruptRecord):
        list(read_records(path))


TF_READER = """
import sys, tensorflow as tf
spec = {
    "image": tf.io.FixedLenFeature([], tf.string), "col": tf.io.FixedLenFeature([], tf.int64),
    "slide_id": tf.io.FixedLenFeature([], tf.string),
    "molecular_score": tf.io.FixedLenFeature([], tf.float32),
}
for raw in tf.data.TFRecordDataset(sys.argv[1]):
    ex = tf.io.parse_single_example(raw, spec)
    img = tf.io.decode_raw(ex["image"], tf.uint8)
    score = round(float(ex["molecular_score"]), 3)
    print(int(ex["col"]), ex["slide_id"].numpy().decode(), int(img[0]), score)
"""


def test_tensorflow_reads_our_shards(tmp_path):
    """The records come from a wire-compatible copy of tf.train.Example; TF must agree."""
    path = tmp_path / "a.tfrecord"
    with AtomicShardWriter(path) as w:
        for i in range(2):
            w.write(_example(i))
        w.commit()
    out = subprocess.run(
        [sys.executable, "-c", TF_READER, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    ).stdout.split("\n")
    assert out[:2] == ["0 s1 0 0.25", "1 s1 1 0.25"]


def _protobuf_example(record: TileRecord, labels: TileLabels) -> tfx.Example:
    """The same Example built with the protobuf runtime (the encoder tile_example replaced)."""
    tile = record.image
    meta = {**vars(record), **dataclasses.asdict(labels)}

    def b(v):
        return tfx.Feature(bytes_list=tfx.BytesList(value=[v]))

    def i(v):
        return tfx.Feature(int64_list=tfx.Int64List(value=[v]))

    def f(v):
        return tfx.Feature(float_list=tfx.FloatList(value=[v]))

    h, w, c = tile.shape
    feats = {"image": b(tile.tobytes()), "height": i(h), "width": i(w), "channels": i(c)}
    feats |= {k: b(meta[k].encode()) for k in ("slide_id", "split", "spec_hash")}
    feats |= {k: i(meta[k]) for k in ("col", "row", "x", "y", "level", "tumor_score")}
    feats |= {k: f(meta[k]) for k in ("molecular_score", "tissue")}
    return tfx.Example(features=tfx.Features(feature=feats))


@pytest.mark.parametrize(
    "shape,score,molecular,slide_id",
    [
        ((256, 256, 3), -1, 1.5, "large"),
        ((8, 8, 3), 3, -0.25, "s1"),
        ((300, 200, 3), 2**40, 0.0, "ü" * 90),
    ],
)
def test_hand_encoded_example_is_the_protobuf_example(tmp_path, shape, score, molecular, slide_id):
    tile = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    record = TileRecord(tile, col=1234, row=2**31 + 5, x=-7, y=0, tissue=0.9371)
    labels = TileLabels(
        slide_id, spec_hash="abc123", level=2, split="validation", tumor_score=score,
        molecular_score=molecular,
    )  # fmt: skip
    parts = tile_example_parts(record, labels)
    data = tile_example(record, labels)
    expected = _protobuf_example(record, labels)
    assert data == b"".join(parts) and len(data) == expected.ByteSize()
    assert tfx.Example.FromString(data) == expected
    unknown = TileLabels(slide_id, spec_hash="abc123", level=2, split="validation")
    nan = tfx.Example.FromString(tile_example(record, unknown))
    assert nan.features.feature["tumor_score"].int64_list.value[0] == -1
    assert np.isnan(nan.features.feature["molecular_score"].float_list.value[0])
    whole, pieces = tmp_path / "whole.tfrecord", tmp_path / "pieces.tfrecord"
    for path, written in ((whole, data), (pieces, parts)):
        with AtomicShardWriter(path) as w:
            w.write(written)
            w.commit()
    assert whole.read_bytes() == pieces.read_bytes()
    assert list(read_records(pieces)) == [data]
