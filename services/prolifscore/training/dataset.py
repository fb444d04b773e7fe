"""Training data: find and verify the preprocessing pipeline's shards, then feed them to Keras.

Two halves:

- TensorFlow-free bookkeeping (`find_shards`, `shards_from_index`, `verify_shards`,
  `check_dataset`, `dataset_fingerprint`): everything that can be wrong with a data set (missing,
  empty, labels outside 1-3, a shard that fails its checksum or does not parse) is found here,
  before any training time is spent.
- `tf.data` pipelines (`train_dataset`, `eval_dataset`): interleaved TFRecord reading, decoding
  of raw uint8 tiles, augmentation in uint8 (so `preprocess_tumor`, the serving signature's own
  preprocessing, applies unchanged), slide- and class-balanced sampling, prefetching.

Why balance by slide and class: the seed's slides held 1 to 20,723 tiles each, so tile-uniform
sampling would learn a handful of large slides and the majority class.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import google_crc32c

from prolifscore.core.wsi.tfrecord import CorruptRecord, parse_tile_example, read_records

if TYPE_CHECKING:
    import tensorflow as tf

    from prolifscore.v1 import pipeline_pb2 as pb

SPLITS = ("train", "validation")
TUMOR_SCORES = (1, 2, 3)
Balance = Literal["slide_class", "class", "slide", "none"]


class DatasetError(ValueError):
    """The data set cannot be trained on; raised before training starts."""


@dataclass(frozen=True)
class ShardRef:
    """One TFRecord shard and the labels of its slide (every tile of a shard shares them)."""

    path: str
    slide_id: str
    split: str
    tumor_score: int | None
    molecular_score: float | None
    tile_count: int
    crc32c: str = ""  # hex CRC32C of the whole file; "" = unknown (verify record checksums)


@dataclass
class ShardCheck:
    """Result of `verify_shards`: usable shards, and the rejected ones with their reasons."""

    good: list[ShardRef] = field(default_factory=list)
    bad: list[tuple[ShardRef, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def report(self) -> dict[str, Any]:
        return {
            "good_shards": len(self.good),
            "skipped_shards": len(self.bad),
            "skipped": [{"path": s.path, "reason": why} for s, why in self.bad],
        }


# --------------------------------------------------------------------------------------------
# Finding shards.


def _label(value: Any, where: str) -> int | None:
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise DatasetError(f"{where}: tumor score {value!r} is not an integer in 1-3")
    return int(value)


def _molecular(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def find_shards(
    dataset_dir: Path | str, *, spec_hash: str | None = None, require_labels: bool = True
) -> list[ShardRef]:
    """Every shard listed by the per-slide manifests under a tiles root.

    Only manifests count: a slide whose batches are not all done has none yet, so a data set
    read while preprocessing still runs never trains on half a slide. A slide preprocessed
    under several tiling specs needs `spec_hash` to pick one (else its tiles would count twice).
    Raises `DatasetError` for a missing or empty data set, labels outside 1-3, unlabelled slides
    (when `require_labels`) and listed shards that are missing on disk.
    """
    root = Path(dataset_dir).resolve()  # Ray Train workers run in another directory
    if not root.is_dir():
        raise DatasetError(f"data set directory {root} does not exist")
    manifests = sorted(root.rglob("*.manifest.json"))
    if not manifests:
        raise DatasetError(
            f"no slide manifests (*.manifest.json) under {root}: not a tiles root written by "
            "the preprocessing pipeline, or no slide has finished filtering"
        )
    shards: list[ShardRef] = []
    missing: list[str] = []
    specs_by_slide: dict[str, set[str]] = {}
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: unreadable manifest ({exc})") from exc
        spec = str(manifest.get("spec_hash", ""))
        if spec_hash is not None and spec != spec_hash:
            continue
        slide = str(manifest.get("slide_id", ""))
        if not slide:
            raise DatasetError(f"{path}: manifest without slide_id")
        specs_by_slide.setdefault(slide, set()).add(spec)
        split = manifest.get("split", "train")
        if split not in SPLITS:
            raise DatasetError(f"{path}: split {split!r} is not one of {SPLITS}")
        labels = manifest.get("labels") or {}
        score = _label(labels.get("tumor_score"), str(path))
        mol = _molecular(labels.get("molecular_score"))
        for entry in manifest.get("shards", []):
            if not entry.get("shard") or not entry.get("tile_count"):
                continue
            shard = path.parent / entry["shard"]
            if not shard.is_file():
                missing.append(str(shard))
                continue
            shards.append(
                ShardRef(
                    path=str(shard),
                    slide_id=slide,
                    split=split,
                    tumor_score=score,
                    molecular_score=mol,
                    tile_count=int(entry["tile_count"]),
                    crc32c=str(entry.get("crc32c", "")),
                )
            )
    twice = sorted(s for s, specs in specs_by_slide.items() if len(specs) > 1)
    if twice:
        raise DatasetError(
            f"{len(twice)} slides were preprocessed under several tiling specs (e.g. "
            f"{twice[0]!r}: {sorted(specs_by_slide[twice[0]])}); pass spec_hash to choose one"
        )
    if missing:
        raise DatasetError(
            f"{len(missing)} shards listed in manifests are missing on disk, e.g. {missing[0]}"
        )
    check_dataset(shards, require_labels=require_labels, where=str(root))
    return shards


_SPLIT_ENUM = {1: "train", 2: "validation"}


def shards_from_index(
    messages: Iterable[pb.ShardIndex | bytes],
    *,
    root: Path | str | None = None,
    require_labels: bool = True,
) -> list[ShardRef]:
    """Shards from `prolif.tiles.shards` messages (protobuf or their bytes).

    Re-processing a batch republishes the same path with a new checksum: the last message per
    path wins. Relative paths are resolved against `root`. Same validation as `find_shards`.
    """
    from prolifscore.v1 import pipeline_pb2 as pb

    by_path: dict[str, ShardRef] = {}
    missing: list[str] = []
    for raw in messages:
        msg = pb.ShardIndex.FromString(raw) if isinstance(raw, bytes) else raw
        if not msg.path or msg.tile_count <= 0:
            continue
        path = Path(msg.path)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        where = f"shard index for {msg.path}"
        score = (
            _label(msg.labels.tumor_score, where) if msg.labels.HasField("tumor_score") else None
        )
        mol = (
            _molecular(msg.labels.molecular_score)
            if msg.labels.HasField("molecular_score")
            else None
        )
        by_path[str(path)] = ShardRef(
            path=str(path),
            slide_id=msg.slide_id,
            split=_SPLIT_ENUM.get(msg.split, "train"),
            tumor_score=score,
            molecular_score=mol,
            tile_count=int(msg.tile_count),
            crc32c=msg.crc32c,
        )
    shards = sorted(by_path.values(), key=lambda s: s.path)
    missing = [s.path for s in shards if not Path(s.path).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} indexed shards are missing on disk, e.g. {missing[0]}")
    check_dataset(shards, require_labels=require_labels, where="the shard index")
    return shards


def check_dataset(
    shards: Sequence[ShardRef],
    *,
    require_labels: bool = True,
    require_splits: Sequence[str] = (),
    where: str = "the data set",
) -> None:
    """Raise `DatasetError` for an empty set, labels outside 1-3, unlabelled slides (if
    `require_labels`), a slide with conflicting labels or splits, or an empty required split."""
    if not shards:
        raise DatasetError(f"{where} holds no tiles (no non-empty shard)")
    bad = sorted(
        {f"{s.slide_id}={s.tumor_score}" for s in shards if s.tumor_score is not None}
        - {f"{s.slide_id}={s.tumor_score}" for s in shards if s.tumor_score in TUMOR_SCORES}
    )
    if bad:
        raise DatasetError(
            f"{len(bad)} slides in {where} have tumor scores outside 1-3: {', '.join(bad[:5])}"
        )
    if require_labels:
        unlabelled = sorted({s.slide_id for s in shards if s.tumor_score is None})
        if unlabelled:
            raise DatasetError(
                f"{len(unlabelled)} slides in {where} have no tumor score, e.g. "
                f"{unlabelled[0]!r}: training needs labels (filter them out or label them)"
            )
    per_slide: dict[str, tuple[str, int | None]] = {}
    for s in shards:
        seen = per_slide.setdefault(s.slide_id, (s.split, s.tumor_score))
        if seen != (s.split, s.tumor_score):
            raise DatasetError(
                f"slide {s.slide_id!r} has shards with different split/labels: {seen} vs "
                f"{(s.split, s.tumor_score)}"
            )
    for split in require_splits:
        if not any(s.split == split for s in shards):
            raise DatasetError(
                f"{where} has no {split!r} slides (the split is assigned per slide at "
                "preprocessing: 80/20, stratified by score)"
            )


# --------------------------------------------------------------------------------------------
# Verifying shards.

_REQUIRED = ("image", "height", "width", "channels", "slide_id", "tumor_score", "split")


def verify_shard(shard: ShardRef) -> str | None:
    """None if the shard is usable, else why not.

    With a known file checksum one CRC32C pass proves the bytes are those written, and the
    record framing is walked to check the tile count; without it every record's own checksum
    is verified. The first record is parsed to check its features and labels against the
    manifest (a cheap guard against a shard filed under the wrong slide).
    """
    path = Path(shard.path)
    try:
        if shard.crc32c:
            crc = google_crc32c.Checksum()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    crc.update(chunk)
            actual = crc.hexdigest().decode()
            if actual != shard.crc32c.lower():
                return f"checksum mismatch (crc32c {actual}, expected {shard.crc32c})"
        first: bytes | None = None
        count = 0
        for record in read_records(path, verify=not shard.crc32c):
            if first is None:
                first = record
            count += 1
    except FileNotFoundError:
        return "missing"
    except CorruptRecord as exc:
        return f"does not parse: {exc}"
    except OSError as exc:
        return f"unreadable: {exc}"
    if first is None:
        return "no records"
    if count != shard.tile_count:
        return f"holds {count} records, the index says {shard.tile_count}"
    try:
        ex = parse_tile_example(first)
    except Exception as exc:  # protobuf DecodeError, KeyError, reshape ValueError
        return f"does not parse: {type(exc).__name__}: {exc}"
    absent = [k for k in _REQUIRED if k not in ex]
    if absent:
        return f"does not parse: records lack {absent}"
    if int(ex["channels"]) != 3:  # type: ignore[call-overload]
        return f"tiles have {ex['channels']} channels, expected 3 (RGB)"
    if ex["slide_id"] != shard.slide_id:
        return f"records belong to slide {ex['slide_id']!r}, not {shard.slide_id!r}"
    record_score = int(ex["tumor_score"])  # type: ignore[call-overload]
    if shard.tumor_score is not None and record_score != shard.tumor_score:
        return f"records carry tumor score {record_score}, the index says {shard.tumor_score}"
    return None


def verify_shards(shards: Sequence[ShardRef], *, threads: int = 4) -> ShardCheck:
    """Check every shard up front (`verify_shard`); the caller skips the bad ones and reports
    their count, so a damaged shard never fails a run hours in or silently drops data."""
    check = ShardCheck()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard, why in zip(shards, pool.map(verify_shard, shards), strict=True):
            if why is None:
                check.good.append(shard)
            else:
                check.bad.append((shard, why))
    return check


def dataset_fingerprint(shards: Sequence[ShardRef]) -> str:
    """Identifies the exact training data: shard file names, checksums and tile counts (names
    rather than absolute paths, so a data set moved to another mount keeps its fingerprint)."""
    h = hashlib.sha256()
    for s in sorted(shards, key=lambda s: Path(s.path).name):
        h.update(f"{Path(s.path).name}\t{s.crc32c}\t{s.tile_count}\t{s.split}\n".encode())
    return h.hexdigest()[:16]


def describe(shards: Sequence[ShardRef]) -> dict[str, Any]:
    """Slides and tiles per split and class (logs, export metadata, sanity checks)."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        part = [s for s in shards if s.split == split]
        slides: dict[str, int | None] = {s.slide_id: s.tumor_score for s in part}
        out[split] = {
            "slides": len(slides),
            "tiles": sum(s.tile_count for s in part),
            "shards": len(part),
            "slides_per_class": {
                str(c): sum(1 for v in slides.values() if v == c) for c in TUMOR_SCORES
            },
            "tiles_per_class": {
                str(c): sum(s.tile_count for s in part if s.tumor_score == c) for c in TUMOR_SCORES
            },
        }
    return out


def by_slide(shards: Iterable[ShardRef]) -> dict[str, list[ShardRef]]:
    out: dict[str, list[ShardRef]] = {}
    for s in shards:
        out.setdefault(s.slide_id, []).append(s)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# tf.data pipelines.


@dataclass(frozen=True)
class Augment:
    """Augmentation strengths. Defaults: mild H&E stain/scanner variation; flips and 90-degree
    rotations are exact symmetries of a tissue tile."""

    flips: bool = True
    rotations: bool = True
    brightness: float = 0.08  # max additive delta on [0, 1]
    contrast: float = 0.2  # factor in [1 - c, 1 + c]
    saturation: float = 0.2  # factor in [1 - s, 1 + s]
    hue: float = 0.03  # max hue shift (fraction of the colour wheel)

    @classmethod
    def off(cls) -> Augment:
        return cls(False, False, 0.0, 0.0, 0.0, 0.0)


def _features() -> dict[str, Any]:
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "channels": tf.io.FixedLenFeature([], tf.int64, default_value=3),
        "slide_id": tf.io.FixedLenFeature([], tf.string),
        "tumor_score": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "molecular_score": tf.io.FixedLenFeature([], tf.float32, default_value=float("nan")),
    }


def decode_tile(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """One serialized tile Example -> image uint8 [H,W,3], label (tumor_score - 1, int32;
    -1 - 1 = -2 marks unknown), slide_id, molecular_score."""
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, _features())
    image = tf.io.decode_raw(ex["image"], tf.uint8)
    image = tf.reshape(image, tf.stack([ex["height"], ex["width"], ex["channels"]]))
    image = tf.ensure_shape(image, [None, None, 3])
    return {
        "image": image,
        "label": tf.cast(ex["tumor_score"], tf.int32) - 1,
        "slide_id": ex["slide_id"],
        "molecular_score": ex["molecular_score"],
    }


def augment_tile(image: tf.Tensor, seed: tf.Tensor, aug: Augment = Augment()) -> tf.Tensor:
    """Random flips, 90-degree rotations and colour jitter of a uint8 [H,W,3] tile -> uint8.

    Stateless ops keyed by a per-element `seed` ([2] int) so that a run is reproducible. The
    jitter is done in float [0, 1], clipped and rounded back to uint8: the model then sees
    the same value domain the serving signature receives (uint8 tiles).
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)
    x = image
    if aug.flips:
        x = tf.image.stateless_random_flip_left_right(x, seeds[0])
        x = tf.image.stateless_random_flip_up_down(x, seeds[1])
    if aug.rotations:
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        x = tf.image.rot90(x, k)
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        f = tf.image.convert_image_dtype(x, tf.float32)
        if aug.brightness:
            f = tf.image.stateless_random_brightness(f, aug.brightness, seeds[3])
        if aug.contrast:
            f = tf.image.stateless_random_contrast(
                f, 1.0 - aug.contrast, 1.0 + aug.contrast, seeds[4]
            )
        if aug.saturation:
            f = tf.image.stateless_random_saturation(
                f, 1.0 - aug.saturation, 1.0 + aug.saturation, seeds[5]
            )
        if aug.hue:
            f = tf.image.stateless_random_hue(f, aug.hue, seeds[6])
        x = tf.cast(tf.round(tf.clip_by_value(f, 0.0, 1.0) * 255.0), tf.uint8)
    return x


def _prepare(image: tf.Tensor, input_size: int) -> tf.Tensor:
    """The serving signature's preprocessing, applied to one tile."""
    import tensorflow as tf

    from prolifscore.core.models.contract import preprocess_tumor

    x = preprocess_tumor(image[tf.newaxis], input_size)[0]
    return tf.ensure_shape(x, [input_size, input_size, 3])


def _records(paths: Sequence[str], seed: int, cycle_length: int, parallel: bool) -> tf.data.Dataset:
    """An endless, shuffled stream of serialized records from `paths`, read interleaved."""
    import tensorflow as tf

    files = tf.data.Dataset.from_tensor_slices(list(paths))
    files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()
    return files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=max(1, min(cycle_length, len(paths))),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE if parallel else None,
        deterministic=False,
    )


def class_weight_table(
    shards: Sequence[ShardRef],
    balance: Balance,
    class_weights: Mapping[int, float] | Literal["balanced"] | None,
    classes: int = 3,
) -> list[float] | None:
    """Per-class loss weights indexed by label (score - 1), or None.

    "balanced" makes the classes' expected contributions equal under the chosen sampling: with
    class-balanced sampling that is all ones (the sampler already balances); otherwise the
    inverse of each class's sampled share. A mapping gives weights per tumor score.
    """
    if class_weights is None:
        return None
    if class_weights != "balanced":
        if not isinstance(class_weights, Mapping):
            raise ValueError(
                f"class_weights must be None, 'balanced' or a mapping, got {class_weights!r}"
            )
        return [float(class_weights.get(c + 1, 1.0)) for c in range(classes)]
    train = [s for s in shards if s.split == "train"]
    if balance in ("slide_class", "class"):
        share = [1.0 / classes] * classes
    elif balance == "slide":
        slides = {s.slide_id: s.tumor_score for s in train}
        share = [
            sum(1 for v in slides.values() if v == c + 1) / len(slides) for c in range(classes)
        ]
    else:
        tiles = sum(s.tile_count for s in train)
        share = [
            sum(s.tile_count for s in train if s.tumor_score == c + 1) / tiles
            for c in range(classes)
        ]
    return [(1.0 / classes) / p if p > 0 else 0.0 for p in share]


def train_dataset(
    shards: Sequence[ShardRef],
    *,
    input_size: int,
    batch_size: int,
    seed: int = 0,
    balance: Balance = "slide_class",
    class_weights: Mapping[int, float] | Literal["balanced"] | None = None,
    augment: Augment | None = None,
    shuffle_buffer: int = 256,
    slide_buffer: int = 16,
    cycle_length: int = 4,
    parallel_reads: bool | None = None,
    classes: int = 3,
) -> tf.data.Dataset:
    """Endless batches `(x, y)` (or `(x, y, w)` with class weights) from the train split.

    `balance`: "slide_class" draws a class uniformly, then a slide of that class uniformly,
    then a tile of that slide (hierarchical `sample_from_datasets`); "class" draws classes
    uniformly and tiles within a class in proportion to its slides' tiles; "slide" draws slides
    uniformly; "none" reads every shard interleaved (tile-proportional). The stream never ends:
    callers fix steps per epoch. Each balanced leaf keeps a small shuffle buffer of serialized
    tiles (`slide_buffer`) — memory grows with slides x buffer x tile bytes (500 slides x 16 x
    196 KB ~ 1.5 GB), hence the small default; a larger `shuffle_buffer` mixes after sampling.
    `parallel_reads` (default: when there are at most 64 leaf streams) reads each leaf's
    shards with a parallel interleave; with hundreds of leaves sequential leaves and the
    parallel decode map avoid hundreds of reader threads.
    """
    import tensorflow as tf

    train = [s for s in shards if s.split == "train"]
    check_dataset(train, require_labels=True, where="the train split")
    aug = augment if augment is not None else Augment()
    rng_seed = int(seed) % (2**31 - 1)

    def leaf(group: Sequence[ShardRef], k: int, parallel: bool) -> tf.data.Dataset:
        ds = _records([s.path for s in group], rng_seed + 7919 * k, cycle_length, parallel)
        return ds.shuffle(slide_buffer, seed=rng_seed + 104729 * k) if slide_buffer > 1 else ds

    def mix(parts: list[tf.data.Dataset], k: int) -> tf.data.Dataset:
        if len(parts) == 1:
            return parts[0]
        return tf.data.Dataset.sample_from_datasets(
            parts, weights=[1.0 / len(parts)] * len(parts), seed=rng_seed + 31 * k
        )

    present = sorted({s.tumor_score for s in train if s.tumor_score is not None})
    slides = by_slide(train)
    if balance == "slide_class":
        parallel = len(slides) <= 64 if parallel_reads is None else parallel_reads
        per_class = []
        for c in present:
            group = [g for g in slides.values() if g[0].tumor_score == c]
            per_class.append(mix([leaf(g, i + 1000 * c, parallel) for i, g in enumerate(group)], c))
        records = mix(per_class, 0)
    elif balance == "class":
        parallel = True if parallel_reads is None else parallel_reads
        records = mix(
            [leaf([s for s in train if s.tumor_score == c], c, parallel) for c in present], 0
        )
    elif balance == "slide":
        parallel = len(slides) <= 64 if parallel_reads is None else parallel_reads
        records = mix([leaf(g, i, parallel) for i, g in enumerate(slides.values())], 0)
    elif balance == "none":
        records = _records([s.path for s in train], rng_seed, cycle_length, True)
    else:
        raise ValueError(f"balance must be slide_class, class, slide or none, got {balance!r}")

    weights = class_weight_table(shards, balance, class_weights, classes)
    if shuffle_buffer > 1:
        records = records.shuffle(shuffle_buffer, seed=rng_seed + 1)
    noise = tf.data.Dataset.random(seed=rng_seed + 2).batch(2)

    def to_example(serialized: tf.Tensor, element_seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
        tile = decode_tile(serialized)
        x = _prepare(augment_tile(tile["image"], element_seed, aug), input_size)
        y = tile["label"]
        if weights is None:
            return x, y
        return x, y, tf.gather(tf.constant(weights, tf.float32), y)

    ds = tf.data.Dataset.zip((records, noise)).map(
        to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Every worker samples its own endless stream (seeded per worker): sharding by file would
    # break the balanced sampler.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def eval_dataset(
    shards: Sequence[ShardRef],
    *,
    input_size: int,
    batch_size: int,
    split: str | None = "validation",
    max_tiles_per_slide: int | None = None,
    cycle_length: int = 4,
) -> tf.data.Dataset:
    """Finite, unaugmented batches of dicts {image, label, slide_id, molecular_score}: every
    tile (or an evenly strided subset, at most `max_tiles_per_slide` per slide, which bounds
    per-epoch validation on huge slides) so predictions can be aggregated per slide."""
    import tensorflow as tf

    part = [s for s in shards if split is None or s.split == split]
    if not part:
        raise DatasetError(f"no shards in the {split!r} split")
    paths, strides = [], []
    for group in by_slide(part).values():
        total = sum(s.tile_count for s in group)
        stride = 1 if not max_tiles_per_slide else max(1, math.ceil(total / max_tiles_per_slide))
        for s in group:
            paths.append(s.path)
            strides.append(stride)
    files = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(strides, tf.int64)))
    records = files.interleave(
        lambda p, k: tf.data.TFRecordDataset(p).shard(k, 0),
        cycle_length=max(1, min(cycle_length, len(paths))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

    def prepare(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        tile = decode_tile(serialized)
        tile["image"] = _prepare(tile["image"], input_size)
        return tile

    ds = records.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
