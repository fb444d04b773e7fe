"""Training data: shard discovery and verification, the tf.data pipeline, TUPAC16 metrics."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.grading.evaluation import (
    aggregate_slide,
    apply_cutpoints,
    confusion_matrix,
    fit_cutpoints,
    quadratic_weighted_kappa,
    slide_metrics,
    slide_scores,
    spearman,
)
from prolifscore.core.grading.submission import EvaluationError, evaluate_predictions
from prolifscore.core.wsi.shards import shard_path, write_manifest
from prolifscore.core.wsi.tfrecord import (
    AtomicShardWriter,
    TileLabels,
    TileRecord,
    parse_tile_example,
    read_records,
    tile_example,
)
from prolifscore.training.data.pipeline import (
    Augment,
    augment_tile,
    class_weight_table,
    eval_dataset,
    train_dataset,
)
from prolifscore.training.data.shards import (
    DatasetError,
    ShardRef,
    ShardSlice,
    check_dataset,
    dataset_fingerprint,
    find_shards,
    shards_from_index,
    verify_shards,
    worker_share,
)

SPEC = "spec0"

# Per-class look: H&E-like pink background getting darker and more purple with the score, and
# more dark "nuclei" — learnable from colour alone even at 32 px and after colour jitter.
_BACKGROUND = {1: (235, 170, 200), 2: (175, 110, 170), 3: (105, 60, 140)}
_NUCLEI = {1: 1, 2: 4, 3: 9}


def synthetic_tile(score: int, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(_BACKGROUND[score], np.float32)
    tile = base + rng.normal(0, 12, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(_NUCLEI[score]):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 16, size / 9)
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (60, 20, 90)
    return np.clip(tile, 0, 255).astype(np.uint8)


def write_slide(
    root: Path,
    slide_id: str,
    score: int | None,
    split: str,
    tiles: int,
    *,
    size: int = 32,
    shards: int = 1,
    molecular: float | None = None,
    seed: int = 0,
    look: int | None = None,
) -> list[Path]:
    """One slide as the preprocessing pipeline leaves it: shards, markers' info, manifest.

    Tiles look like class `look` (default: `score`, or 2 when unlabelled), so a `look` other
    than `score` makes a mislabelled slide."""
    rng = np.random.default_rng(seed)
    look = look or (score if score in (1, 2, 3) else 2)
    in_record = score if score is not None else -1
    markers, paths = [], []
    per = [tiles // shards + (1 if i < tiles % shards else 0) for i in range(shards)]
    k = 0
    for b, count in enumerate(per):
        path = shard_path(root, slide_id, SPEC, b, shards)
        with AtomicShardWriter(path) as w:
            for _ in range(count):
                w.write(
                    tile_example(
                        TileRecord(synthetic_tile(look, size, rng), k, 0, k * size, 0, 1.0),
                        TileLabels(
                            slide_id,
                            SPEC,
                            level=0,
                            split=split,
                            tumor_score=in_record,
                            molecular_score=float("nan") if molecular is None else molecular,
                        ),
                    )
                )
                k += 1
            w.commit()
            markers.append(
                {
                    "batch_index": b,
                    "shard": path.name,
                    "tile_count": w.count,
                    "size_bytes": w.size,
                    "crc32c": w.crc32c,
                    "seconds": 0.0,
                }
            )
        paths.append(path)
    summary = {
        "path": f"/slides/{slide_id}.svs",
        "split": split,
        "labels": {"tumor_score": score, "molecular_score": molecular},
    }
    write_manifest(root, slide_id, SPEC, summary, markers)
    return paths


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """6 train slides (2 per class; very unequal tile counts), 3 validation slides."""
    root = tmp_path / "tiles"
    counts = {1: (2, 30), 2: (3, 12), 3: (25, 1)}
    for score, (a, b) in counts.items():
        write_slide(
            root, f"tr-{score}a", score, "train", a, seed=score * 10, shards=2 if a > 5 else 1
        )
        write_slide(root, f"tr-{score}b", score, "train", b, seed=score * 10 + 1)
        write_slide(
            root, f"va-{score}", score, "validation", 4, seed=score * 10 + 2, molecular=0.1 * score
        )
    return root


# --------------------------------------------------------------------------------------------
# Discovery and validation.


def test_find_shards_reads_manifests(small_root: Path) -> None:
    shards = find_shards(small_root)
    assert {s.slide_id for s in shards} == {
        "tr-1a",
        "tr-1b",
        "tr-2a",
        "tr-2b",
        "tr-3a",
        "tr-3b",
        "va-1",
        "va-2",
        "va-3",
    }
    assert sum(s.tile_count for s in shards) == 2 + 30 + 3 + 12 + 25 + 1 + 12
    va2 = next(s for s in shards if s.slide_id == "va-2")
    assert (va2.split, va2.tumor_score, va2.molecular_score) == ("validation", 2, 0.2)
    assert all(len(s.crc32c) == 8 and Path(s.path).is_file() for s in shards)
    check = verify_shards(shards)
    assert check.skipped == 0 and len(check.good) == len(shards)


def test_empty_or_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        find_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no slide manifests"):
        find_shards(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no tiles"):
        check_dataset([])


def test_label_outside_range_is_rejected(tmp_path: Path) -> None:
    write_slide(tmp_path, "ok", 2, "train", 2)
    write_slide(tmp_path, "four", 4, "train", 2)
    with pytest.raises(DatasetError, match="outside 1-3"):
        find_shards(tmp_path)


def test_unlabelled_slides_and_missing_shards(tmp_path: Path) -> None:
    write_slide(tmp_path, "unlabelled", None, "train", 2)
    with pytest.raises(DatasetError, match="no tumor score"):
        find_shards(tmp_path)
    assert find_shards(tmp_path, require_labels=False)[0].tumor_score is None
    (path,) = write_slide(tmp_path, "gone", 1, "train", 2)
    path.unlink()
    with pytest.raises(DatasetError, match="missing on disk"):
        find_shards(tmp_path, require_labels=False)


def test_required_split(small_root: Path) -> None:
    train_only = [s for s in find_shards(small_root) if s.split == "train"]
    with pytest.raises(DatasetError, match="no 'validation' slides"):
        check_dataset(train_only, require_splits=("train", "validation"))


def test_corrupt_and_unparseable_shards_are_skipped_with_reasons(small_root: Path) -> None:
    shards = find_shards(small_root)
    flipped = Path(next(s.path for s in shards if s.slide_id == "tr-2b"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = Path(next(s.path for s in shards if s.slide_id == "tr-1b"))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage = next(s for s in shards if s.slide_id == "va-3")
    Path(garbage.path).write_bytes(b"not a tfrecord at all")
    check = verify_shards(shards)
    assert check.skipped == 3
    reasons = {Path(s.path).name.split("-spec0")[0]: why for s, why in check.bad}
    assert "checksum mismatch" in reasons["tr-2b"]
    assert "checksum mismatch" in reasons["tr-1b"]
    # Without a file checksum (e.g. an older index), record checksums catch the same damage.
    unknown = [ShardRef(**{**s.__dict__, "crc32c": ""}) for s in shards]
    check = verify_shards(unknown)
    assert check.skipped == 3
    assert all("does not parse" in why for _, why in check.bad), check.bad
    assert check.report()["skipped_shards"] == 3


def test_shard_index_messages(small_root: Path) -> None:
    from prolifscore.v1 import pipeline_pb2 as pb

    shards = find_shards(small_root)
    msgs = []
    for s in shards:
        labels = pb.Labels(tumor_score=s.tumor_score)
        if s.molecular_score is not None:
            labels.molecular_score = s.molecular_score
        split = pb.SPLIT_TRAIN if s.split == "train" else pb.SPLIT_VALIDATION
        msg = pb.ShardIndex(
            slide_id=s.slide_id,
            path=s.path,
            tile_count=s.tile_count,
            split=split,
            labels=labels,
            crc32c=s.crc32c,
        )
        msgs.append(msg.SerializeToString())
    msgs.append(msgs[0])  # a redelivered message is not a second shard
    assert sorted(shards_from_index(msgs), key=lambda s: s.path) == sorted(
        shards, key=lambda s: s.path
    )
    bad = pb.ShardIndex(slide_id="x", path=shards[0].path, tile_count=1)
    bad.labels.tumor_score = 0
    with pytest.raises(DatasetError, match="outside 1-3"):
        shards_from_index([*msgs, bad])


def test_fingerprint_tracks_content(small_root: Path) -> None:
    shards = find_shards(small_root)
    assert dataset_fingerprint(shards) == dataset_fingerprint(list(reversed(shards)))
    changed = [ShardRef(**{**shards[0].__dict__, "crc32c": "00000000"}), *shards[1:]]
    assert dataset_fingerprint(changed) != dataset_fingerprint(shards)


# --------------------------------------------------------------------------------------------
# tf.data.


def test_train_batches_shapes_labels_and_preprocessing(small_root: Path) -> None:
    import tensorflow as tf

    from prolifscore.core.models.contract import preprocess_tumor

    shards = find_shards(small_root)
    ds = train_dataset(shards, input_size=48, batch_size=8, seed=1, augment=Augment.off())
    x, y = next(iter(ds))
    assert x.shape == (8, 48, 48, 3) and x.dtype == tf.float32
    assert y.dtype == tf.int32 and set(y.numpy()) <= {0, 1, 2}
    # Unaugmented tiles go through exactly the serving signature's preprocessing.
    ev = next(iter(eval_dataset(shards, input_size=48, batch_size=4)))
    first = next(s for s in sorted(shards, key=lambda s: s.slide_id) if s.split == "validation")
    tile = parse_tile_example(next(read_records(first.path)))["image"]
    expected = preprocess_tumor(np.asarray(tile)[None], 48)[0].numpy()
    assert ev["slide_id"].numpy()[0].decode() == first.slide_id
    np.testing.assert_allclose(ev["image"].numpy()[0], expected, atol=1e-3)
    assert ev["label"].numpy()[0] == first.tumor_score - 1


def test_augmentation_keeps_uint8_tiles() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    tile = tf.constant(synthetic_tile(2, 32, rng))
    outs = [augment_tile(tile, tf.constant([i, 7], tf.int64)).numpy() for i in range(12)]
    assert all(o.dtype == np.uint8 and o.shape == (32, 32, 3) for o in outs)
    assert len({o.tobytes() for o in outs}) > 6  # flips/rotations/jitter vary per seed
    same = augment_tile(tile, tf.constant([3, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(same, outs[3])  # stateless: reproducible
    # Geometry only: the pixel multiset is unchanged (flips and 90-degree rotations).
    geo = augment_tile(tile, tf.constant([5, 1], tf.int64), Augment(True, True, 0, 0, 0, 0))
    assert sorted(geo.numpy().ravel()) == sorted(tile.numpy().ravel())


def test_slide_and_class_balanced_sampling(small_root: Path) -> None:
    """Tiles per class are 32 / 15 / 26 and per slide 1 to 30; the sampler draws classes and,
    within a class, slides uniformly."""
    shards = find_shards(small_root)
    draws = 960
    ds = train_dataset(
        shards, input_size=32, batch_size=32, seed=3, augment=Augment.off(), shuffle_buffer=1
    )
    labels = np.concatenate([y.numpy() for _, y in ds.take(draws // 32)])
    share = np.bincount(labels, minlength=3) / draws
    assert np.all(np.abs(share - 1 / 3) < 0.06), share
    # Slide balance, seen through the slide ids of the same stream.
    ids = _sampled_slide_ids(shards, draws, seed=4)
    for slide in ("tr-1a", "tr-1b", "tr-3a", "tr-3b"):  # 2 vs 30 tiles, 25 vs 1 tile
        assert abs(ids[slide] / draws - 1 / 6) < 0.05, (slide, ids)
    # Tile-proportional sampling, for contrast, follows the tile counts.
    ds = train_dataset(
        shards, input_size=32, batch_size=32, seed=3, augment=Augment.off(), balance="none"
    )
    labels = np.concatenate([y.numpy() for _, y in ds.take(draws // 32)])
    share = np.bincount(labels, minlength=3) / draws
    assert abs(share[1] - 15 / 73) < 0.06, share


def _sampled_slide_ids(
    shards: list[ShardRef], n: int, seed: int, *, rank: int = 0, world: int = 1
) -> Counter[str]:
    """The slide ids behind worker `rank`'s balanced stream (the sampler `train_dataset`
    uses, its serialized records decoded for their slide ids)."""
    from prolifscore.training.data import pipeline

    train = [s for s in shards if s.split == "train"]
    records = pipeline.sampled_records(worker_share(train, rank, world), "slide_class", seed)
    ids = records.map(lambda r: pipeline.decode_tile(r)["slide_id"]).take(n)
    return Counter(s.decode() for s in ids.as_numpy_iterator())


def test_class_weights(small_root: Path) -> None:
    shards = find_shards(small_root)
    assert class_weight_table(shards, "slide_class", None) is None
    assert class_weight_table(shards, "slide_class", "balanced") == [1.0, 1.0, 1.0]
    w = class_weight_table(shards, "none", "balanced")
    assert w is not None and w[1] > w[2] > w[0]  # 15 < 26 < 32 tiles
    assert class_weight_table(shards, "none", {3: 2.0}) == [1.0, 1.0, 2.0]
    ds = train_dataset(shards, input_size=32, batch_size=4, class_weights={3: 2.0})
    _, y, sw = next(iter(ds))
    np.testing.assert_array_equal(sw.numpy(), np.where(y.numpy() == 2, 2.0, 1.0))


def _tile_ids(parts: list[ShardSlice]) -> list[tuple[str, int]]:
    """(slide, column) of every record a share holds, read back from the shard files."""
    out = []
    for part in parts:
        for record in list(read_records(part.shard.path))[part.skip :: part.stride]:
            ex = parse_tile_example(record)
            out.append((str(ex["slide_id"]), int(ex["col"])))  # type: ignore[call-overload]
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_worker_shares_are_disjoint_and_cover_every_record(small_root: Path, world: int) -> None:
    """Class 1's 2 shards (2 and 30 tiles), class 2's 2 and class 3's 3: dealt whole to 2
    workers, split by record when a class has fewer shards than workers."""
    train = [s for s in find_shards(small_root) if s.split == "train"]
    every = sorted(_tile_ids([ShardSlice(s) for s in train]))
    shares = [worker_share(train, rank, world) for rank in range(world)]
    ids = [_tile_ids(share) for share in shares]
    assert sorted(t for i in ids for t in i) == every  # each record exactly once
    for share, mine in zip(shares, ids, strict=True):
        assert sum(p.records for p in share) == len(mine) > 0
        assert {p.shard.tumor_score for p in share} == {1, 2, 3}  # every class on every worker
    if world == 2:  # whole files: no worker reads another's shards
        assert all(p.skip == 0 and p.stride == 1 for share in shares for p in share)
        assert not {p.shard.path for p in shares[0]} & {p.shard.path for p in shares[1]}
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        worker_share(train, 2, 2)


def test_each_worker_samples_only_its_share(small_root: Path) -> None:
    """The balanced stream a worker trains on draws from its share alone."""
    from prolifscore.training.data.pipeline import sampled_records

    train = [s for s in find_shards(small_root) if s.split == "train"]
    drawn = []
    for rank in (0, 1):
        share = worker_share(train, rank, 3)  # class 1 and 3 split by record
        records = sampled_records(share, "slide_class", rank).take(200).as_numpy_iterator()
        seen = {(str(e["slide_id"]), int(e["col"])) for e in map(parse_tile_example, records)}  # type: ignore[call-overload]
        assert seen <= set(_tile_ids(share)) and len(seen) > 10
        drawn.append(seen)
    assert not drawn[0] & drawn[1]
    # The per-worker batch: `train_dataset` of rank 1 of 2 yields batches of its own size.
    ds = train_dataset(train, input_size=32, batch_size=4, rank=1, world=2, augment=Augment.off())
    x, y = next(iter(ds))
    assert x.shape == (4, 32, 32, 3) and y.shape == (4,)


def test_molecular_targets_are_nan_where_the_slide_has_none(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    for score in (1, 2, 3):
        write_slide(root, f"known-{score}", score, "train", 4, seed=score, molecular=score / 10)
        write_slide(root, f"unknown-{score}", score, "train", 4, seed=10 + score)
    shards = find_shards(root)
    ds = train_dataset(shards, input_size=32, batch_size=32, molecular=True, shuffle_buffer=1)
    x, y = next(iter(ds))
    assert set(y) == {"tumor_score", "molecular_score"} and x.shape[0] == 32
    mol = y["molecular_score"].numpy()
    known = mol[np.isfinite(mol)]
    assert 0 < known.size < mol.size  # both kinds of slides are drawn
    assert {round(float(v), 4) for v in known} <= {0.1, 0.2, 0.3}
    # Class weights weigh the class head only.
    ds = train_dataset(shards, input_size=32, batch_size=8, molecular=True, class_weights={3: 2.0})
    _, y, w = next(iter(ds))
    np.testing.assert_array_equal(w["molecular_score"].numpy(), np.ones(8))
    expected = np.where(y["tumor_score"].numpy() == 2, 2.0, 1.0)
    np.testing.assert_array_equal(w["tumor_score"].numpy(), expected)


def test_eval_dataset_keeps_every_tile_or_a_strided_cap(small_root: Path) -> None:
    shards = find_shards(small_root)
    ids = Counter()
    for batch in eval_dataset(shards, input_size=32, batch_size=5, split="train"):
        ids.update(s.decode() for s in batch["slide_id"].numpy())
    assert ids == {"tr-1a": 2, "tr-1b": 30, "tr-2a": 3, "tr-2b": 12, "tr-3a": 25, "tr-3b": 1}
    capped = Counter()
    for batch in eval_dataset(
        shards, input_size=32, batch_size=5, split="train", max_tiles_per_slide=5
    ):
        capped.update(s.decode() for s in batch["slide_id"].numpy())
    assert all(capped[s] <= 6 for s in ids) and capped["tr-1b"] >= 5 and capped["tr-3b"] == 1


# --------------------------------------------------------------------------------------------
# Metrics.


def test_quadratic_weighted_kappa_worked_examples() -> None:
    # Hand-worked (sklearn's formula): confusion [[1,1,0],[0,1,1],[1,0,1]], all marginals 2,
    # N = 6: E = 2*2/6 per cell; sum(W*O) = 1 + 1 + 4 = 6; sum(W*E) = 12 * 2/3 = 8.
    assert quadratic_weighted_kappa([1, 2, 3, 1, 2, 3], [1, 2, 3, 2, 3, 1]) == pytest.approx(0.25)
    assert quadratic_weighted_kappa([1, 2, 3], [1, 2, 3]) == 1.0
    # Reversed: O on the anti-diagonal, sum(W*O) = 8, sum(W*E) = 12/3 = 4 -> 1 - 2 = -1.
    assert quadratic_weighted_kappa([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Unequal marginals: true [1,1,2,3], pred [1,2,2,2]: O = [[1,1,0],[0,1,0],[0,1,0]],
    # rows (2,1,1), cols (1,3,0); E = outer/4; sum(W*O) = 1 + 1 = 2;
    # sum(W*E) = (2*3*1 + 1*1*1 + 1*1*4 + 1*3*1) / 4 = 14/4 -> 1 - 2/3.5 = 3/7.
    assert quadratic_weighted_kappa([1, 1, 2, 3], [1, 2, 2, 2]) == pytest.approx(3 / 7)
    # Same as the general sklearn formula computed independently.
    rng = np.random.default_rng(0)
    t, p = rng.integers(1, 4, 50), rng.integers(1, 4, 50)
    assert quadratic_weighted_kappa(t, p) == pytest.approx(_sklearn_qwk(t, p))
    assert math.isnan(quadratic_weighted_kappa([2, 2], [2, 2]))  # sklearn: NaN (0/0)
    with pytest.raises(ValueError, match="not among the labels"):
        quadratic_weighted_kappa([1, 4], [1, 2])


def _sklearn_qwk(y1: np.ndarray, y2: np.ndarray) -> float:
    """sklearn.metrics.cohen_kappa_score(weights="quadratic") transcribed."""
    confusion = confusion_matrix(y1, y2)
    n_classes = confusion.shape[0]
    sum0 = np.sum(confusion, axis=0)
    sum1 = np.sum(confusion, axis=1)
    expected = np.outer(sum0, sum1) / np.sum(sum0)
    w_mat = np.zeros([n_classes, n_classes], dtype=int)
    w_mat += np.arange(n_classes)
    w_mat = (w_mat - w_mat.T) ** 2
    k = np.sum(w_mat * confusion) / np.sum(w_mat * expected)
    return float(1 - k)


def test_spearman_and_confusion() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks (1,2,3,4) vs (1,3,2,4): d^2 = 2 -> 1 - 6*2/(4*15) = 0.8.
    assert spearman([1, 2, 3, 4], [0.1, 0.5, 0.3, 0.9]) == pytest.approx(0.8)
    assert spearman([1, 2, float("nan"), 3, 4], [1, 3, 5, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    np.testing.assert_array_equal(
        confusion_matrix([1, 1, 2, 3], [1, 2, 2, 2]), [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    )


def test_slide_aggregation_matches_scoring_service() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7], [0.7, 0.2, 0.1]])
    s = aggregate_slide(probs, "mean")
    assert s.score == 1 and s.tiles == 4  # mean probability (0.375, 0.3, 0.325)
    assert s.expected == pytest.approx(0.375 + 2 * 0.3 + 3 * 0.325)
    assert aggregate_slide(probs, "rounded_mean").score == 2  # argmax 1,2,3,1 -> mean 1.75
    scores = slide_scores(probs, ["a", "b", "a", "b"])
    assert scores["a"].score == 3 and scores["b"].score == 1  # (.35,.25,.4) and (.4,.35,.25)
    m = slide_metrics(scores, {"a": 3, "b": 1}, {"a": 2.0, "b": 1.0})
    assert m["accuracy"] == 1.0 and m["slides"] == 2


def test_cutpoints_calibrate_the_slide_decision() -> None:
    # Score-2 slides whose expected score sits below 2 (most of their tiles look "empty"):
    # the argmax/rounding rule calls them 1; cut points fitted on these slides separate them.
    expected = [1.2, 1.25, 1.3, 1.4, 1.42, 1.45, 1.9, 2.2, 2.4]
    labels = [1, 1, 1, 2, 2, 2, 3, 3, 3]
    cuts = fit_cutpoints(expected, labels)
    assert cuts == pytest.approx((1.35, 1.675))  # midpoints between the classes
    np.testing.assert_array_equal(apply_cutpoints(expected, cuts), labels)
    assert quadratic_weighted_kappa(labels, np.round(expected).astype(int)) == pytest.approx(0.5)


def test_evaluate_predictions_formats(tmp_path: Path) -> None:
    gt = tmp_path / "gt.csv"
    gt.write_text("1,0.1\n2,0.5\n3,0.9\n1,0.2\n")  # TUPAC rows: slide i = row i
    pred_rows = tmp_path / "pred_rows.csv"
    pred_rows.write_text("1,0.15\n2,0.4\n3,0.8\n2,0.3\n")
    r = evaluate_predictions(pred_rows, gt)
    assert r["slides"] == 4 and r["accuracy"] == 0.75 and r["missing"] == []
    assert r["kappa"] == pytest.approx(quadratic_weighted_kappa([1, 2, 3, 1], [1, 2, 3, 2]))
    assert r["spearman"] == pytest.approx(spearman([0.15, 0.4, 0.8, 0.3], [0.1, 0.5, 0.9, 0.2]))
    pred_ids = tmp_path / "pred_ids.csv"
    pred_ids.write_text("slide_id,tumor_score\nTUPAC-TE-001,1\nTUPAC-TE-002,2\nTUPAC-TE-003,3\n")
    r = evaluate_predictions(pred_ids, gt)
    assert r["kappa"] == 1.0 and r["missing"] == ["4"] and r["spearman"] is None
    gt_ids = tmp_path / "gt_ids.csv"
    gt_ids.write_text("slide_id,tumor_score,molecular_score\nA,1,0.1\nB,3,\nC,2,0.4\n")
    preds = tmp_path / "p.csv"
    preds.write_text("slide_id,tumor_score,molecular_score\nA,1,0.2\nB,3,0.9\nC,1,0.3\nD,2,1\n")
    r = evaluate_predictions(preds, gt_ids)
    assert r["task1_slides"] == 3 and r["unmatched"] == ["D"] and r["spearman_slides"] == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,tumor_score\nA,4\n")
    with pytest.raises(EvaluationError, match="not one of"):
        evaluate_predictions(bad, gt_ids)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_predictions(tmp_path / "none.csv", gt_ids)
    json.dumps(r)  # the CLI prints it


def test_relative_roots_give_absolute_shard_paths(
    small_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train workers run in their own directory: a relative path would not be found."""
    monkeypatch.chdir(small_root.parent)
    shards = find_shards(small_root.name)
    assert shards and all(Path(s.path).is_absolute() and Path(s.path).is_file() for s in shards)
