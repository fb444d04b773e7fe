"""`tf.data` pipelines over checked shards (`shards`): interleaved TFRecord reading, decoding of
raw uint8 tiles, augmentation in uint8 (so `preprocess_tumor`, the serving signature's own
preprocessing, applies unchanged), slide- and class-balanced sampling, prefetching.

Why balance by slide and class: the seed's slides held 1 to 20,723 tiles each, so tile-uniform
sampling would learn a handful of large slides and the majority class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from prolifscore.training.data.shards import (
    DatasetError,
    ShardRef,
    ShardSlice,
    by_slide,
    check_dataset,
    worker_share,
)

if TYPE_CHECKING:
    import tensorflow as tf

Balance = Literal["slide_class", "class", "slide", "none"]


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


def _records(
    parts: Sequence[ShardSlice], seed: int, cycle_length: int, parallel: bool
) -> tf.data.Dataset:
    """An endless, shuffled stream of serialized records from `parts`, read interleaved."""
    import tensorflow as tf

    if all(p.skip == 0 and p.stride == 1 for p in parts):  # whole shards
        files = tf.data.Dataset.from_tensor_slices([p.shard.path for p in parts])
        read: Any = tf.data.TFRecordDataset
    else:  # a worker's records of shards split by record (`worker_share`)
        files = tf.data.Dataset.from_tensor_slices(
            (
                [p.shard.path for p in parts],
                tf.constant([p.skip for p in parts], tf.int64),
                tf.constant([p.stride for p in parts], tf.int64),
            )
        )

        def read(path: tf.Tensor, skip: tf.Tensor, stride: tf.Tensor) -> tf.data.Dataset:
            return tf.data.TFRecordDataset(path).skip(skip).shard(stride, 0)

    files = files.shuffle(len(parts), seed=seed, reshuffle_each_iteration=True).repeat()
    return files.interleave(
        read,
        cycle_length=max(1, min(cycle_length, len(parts))),
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


def sampled_records(
    share: Sequence[ShardSlice],
    balance: Balance,
    rng_seed: int,
    *,
    slide_buffer: int = 16,
    cycle_length: int = 4,
    parallel_reads: bool | None = None,
) -> tf.data.Dataset:
    """A worker's share of the train split as serialized records, endless, drawn as `balance`
    says (see `train_dataset`)."""
    import tensorflow as tf

    def leaf(group: Sequence[ShardSlice], k: int, parallel: bool) -> tf.data.Dataset:
        ds = _records(group, rng_seed + 7919 * k, cycle_length, parallel)
        return ds.shuffle(slide_buffer, seed=rng_seed + 104729 * k) if slide_buffer > 1 else ds

    def mix(parts: list[tf.data.Dataset], k: int) -> tf.data.Dataset:
        if len(parts) == 1:
            return parts[0]
        return tf.data.Dataset.sample_from_datasets(
            parts, weights=[1.0 / len(parts)] * len(parts), seed=rng_seed + 31 * k
        )

    share = [p for p in share if p.records]
    if not share:
        raise DatasetError("this worker's share of the train split holds no record")
    present = sorted({p.shard.tumor_score for p in share if p.shard.tumor_score is not None})
    slides: dict[str, list[ShardSlice]] = {}
    for p in share:
        slides.setdefault(p.shard.slide_id, []).append(p)
    slides = dict(sorted(slides.items()))
    if balance == "slide_class":
        parallel = len(slides) <= 64 if parallel_reads is None else parallel_reads
        per_class = []
        for c in present:
            group = [g for g in slides.values() if g[0].shard.tumor_score == c]
            per_class.append(mix([leaf(g, i + 1000 * c, parallel) for i, g in enumerate(group)], c))
        return mix(per_class, 0)
    if balance == "class":
        parallel = True if parallel_reads is None else parallel_reads
        return mix(
            [leaf([p for p in share if p.shard.tumor_score == c], c, parallel) for c in present], 0
        )
    if balance == "slide":
        parallel = len(slides) <= 64 if parallel_reads is None else parallel_reads
        return mix([leaf(g, i, parallel) for i, g in enumerate(slides.values())], 0)
    if balance == "none":
        return _records(share, rng_seed, cycle_length, True)
    raise ValueError(f"balance must be slide_class, class, slide or none, got {balance!r}")


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
    molecular: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tf.data.Dataset:
    """Endless batches `(x, y)` (or `(x, y, w)` with class weights) from worker `rank`'s share
    of the train split (`worker_share`; all of it for one worker), `batch_size` tiles each.

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
    `molecular`: targets are a dict {"tumor_score": y, "molecular_score": m} (m NaN where the
    slide has no molecular score: the masked loss skips it), class weights apply to the class
    head only.
    """
    import tensorflow as tf

    train = [s for s in shards if s.split == "train"]
    check_dataset(train, require_labels=True, where="the train split")
    aug = augment if augment is not None else Augment()
    rng_seed = int(seed) % (2**31 - 1)
    records = sampled_records(
        worker_share(train, rank, world),
        balance,
        rng_seed,
        slide_buffer=slide_buffer,
        cycle_length=cycle_length,
        parallel_reads=parallel_reads,
    )
    weights = class_weight_table(shards, balance, class_weights, classes)
    if shuffle_buffer > 1:
        records = records.shuffle(shuffle_buffer, seed=rng_seed + 1)
    noise = tf.data.Dataset.random(seed=rng_seed + 2).batch(2)

    def to_example(serialized: tf.Tensor, element_seed: tf.Tensor) -> tuple[Any, ...]:
        tile = decode_tile(serialized)
        x = _prepare(augment_tile(tile["image"], element_seed, aug), input_size)
        y: Any = tile["label"]
        w = None if weights is None else tf.gather(tf.constant(weights, tf.float32), y)
        if molecular:
            y = {"tumor_score": y, "molecular_score": tile["molecular_score"]}
            if w is not None:
                w = {"tumor_score": w, "molecular_score": tf.ones_like(w)}
        return (x, y) if w is None else (x, y, w)

    ds = tf.data.Dataset.zip((records, noise)).map(
        to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Sharding is done above (`worker_share`), by class, before the balanced sampler: TF's
    # auto-sharding by file would leave a worker without some classes' slides.
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
