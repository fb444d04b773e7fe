"""The preprocessing pipeline's shards as a training data set: find them, check them.

TensorFlow-free bookkeeping (`find_shards`, `shards_from_index`, `verify_shards`,
`check_dataset`, `dataset_fingerprint`): everything that can be wrong with a data set (missing,
empty, labels outside 1-3, a shard that fails its checksum or does not parse) is found here,
before any training time is spent. `pipeline` feeds the checked shards to Keras.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c

from prolifscore.core.wsi.tfrecord import CorruptRecord, parse_tile_example, read_records

if TYPE_CHECKING:
    from prolifscore.v1 import pipeline_pb2 as pb

SPLITS = ("train", "validation")
TUMOR_SCORES = (1, 2, 3)


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


@dataclass(frozen=True)
class ShardSlice:
    """The part of a shard one training worker reads: records `skip`, `skip + stride`, ..."""

    shard: ShardRef
    skip: int = 0
    stride: int = 1

    @property
    def records(self) -> int:
        return max(0, math.ceil((self.shard.tile_count - self.skip) / self.stride))


def worker_share(train: Sequence[ShardRef], rank: int, world: int) -> list[ShardSlice]:
    """Worker `rank`'s disjoint share of the train shards; the `world` shares cover every record.

    Per class (the balanced sampler draws every class on every worker): with at least `world`
    shards, whole shards are dealt round-robin (each worker reads only its files); with fewer,
    every shard is split by record, record m of the class's i-th shard going to worker
    (m + i) mod world, so small classes still reach every worker. Order is by slide and path,
    so every worker computes the same shares from the same list.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if world == 1:
        return [ShardSlice(s) for s in train]
    by_class: dict[int | None, list[ShardRef]] = {}
    for s in sorted(train, key=lambda s: (s.slide_id, s.path)):
        by_class.setdefault(s.tumor_score, []).append(s)
    share: list[ShardSlice] = []
    for _, group in sorted(by_class.items(), key=lambda kv: kv[0] or 0):
        if len(group) >= world:
            share += [ShardSlice(s) for i, s in enumerate(group) if i % world == rank]
            continue
        for i, s in enumerate(group):
            part = ShardSlice(s, (rank - i) % world, world)
            if part.records:
                share.append(part)
    return share
