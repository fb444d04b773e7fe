"""Filter worker: one tile task in, one TFRecord shard out. Run as a Ray actor so that each
worker keeps its slides open across tasks (opening costs far more than a tile read)."""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

from prolifscore.core.wsi.preprocess import READ_AHEAD, TileSource
from prolifscore.core.wsi.shards import shard_path, write_marker
from prolifscore.core.wsi.slide import Slide, SlideError, confine_path, open_slide
from prolifscore.core.wsi.tfrecord import (
    AtomicShardWriter,
    TileLabels,
    TileRecord,
    tile_example_parts,
)
from prolifscore.v1 import pipeline_pb2 as pb

SPLIT_NAMES = {pb.SPLIT_TRAIN: "train", pb.SPLIT_VALIDATION: "validation"}


def shard_labels(task: pb.TileTask) -> TileLabels:
    """What every record of the task's shard carries (unknown labels as -1 and NaN)."""
    labels = task.labels
    return TileLabels(
        slide_id=task.slide_id,
        spec_hash=task.spec.spec_hash,
        level=task.spec.level,
        split=SPLIT_NAMES.get(task.split, "train"),
        tumor_score=labels.tumor_score if labels.HasField("tumor_score") else -1,
        molecular_score=(
            labels.molecular_score if labels.HasField("molecular_score") else float("nan")
        ),
    )


class BatchFilter:
    def __init__(
        self,
        tiles_root: str,
        slide_roots: tuple[str, ...],
        cache_size: int = 8,
        read_threads: int = 2,
    ) -> None:
        self.tiles_root = Path(tiles_root)
        self.slide_roots = slide_roots
        self.cache_size = cache_size
        self.read_threads = max(1, read_threads)
        self._slides: OrderedDict[str, Slide] = OrderedDict()
        self._sources: OrderedDict[tuple[str, str], TileSource] = OrderedDict()
        self.opens = 0  # for tests: slides opened by this worker
        self._reader: ThreadPoolExecutor | None = None  # decodes tiles ahead of the writer

    @property
    def reader(self) -> ThreadPoolExecutor:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(self.read_threads, thread_name_prefix="tile-reader")
        return self._reader

    def _source(self, task: pb.TileTask) -> TileSource:
        key = (task.path, task.spec.spec_hash)
        if key in self._sources:
            self._sources.move_to_end(key)
            return self._sources[key]
        slide = self._slides.get(task.path)
        if slide is None:
            slide = open_slide(confine_path(task.path, self.slide_roots))
            self.opens += 1
            self._slides[task.path] = slide
            if len(self._slides) > self.cache_size:
                _, old = self._slides.popitem(last=False)
                self._sources = OrderedDict(
                    (k, v) for k, v in self._sources.items() if v.slide is not old
                )
                old.close()
        self._slides.move_to_end(task.path)
        source = TileSource(slide, task.spec, task.stain)
        self._sources[key] = source
        if len(self._sources) > self.cache_size:
            self._sources.popitem(last=False)
        return source

    def process_indexed(self, index: int, task_bytes: bytes) -> tuple[int, dict[str, Any]]:
        return index, self.process(task_bytes)

    def process(self, task_bytes: bytes) -> dict[str, Any]:
        """Write the batch's shard atomically, then its marker. Never raises: a failure comes
        back as {"error": ...} and leaves no shard behind."""
        task = pb.TileTask.FromString(task_bytes)
        start = time.perf_counter()
        path = shard_path(
            self.tiles_root, task.slide_id, task.spec.spec_hash, task.batch_index, task.batch_count
        )
        base = {
            "slide_id": task.slide_id,
            "batch_index": task.batch_index,
            "batch_count": task.batch_count,
        }
        try:
            source = self._source(task)
            labels = shard_labels(task)
            kept: list[list[int]] = []
            with (
                AtomicShardWriter(path) as writer,
                closing(
                    source.read_ahead(task.tiles, self.reader, READ_AHEAD * self.read_threads)
                ) as tiles,
            ):
                for tile, rgb in tiles:
                    result = source.finish(tile, rgb)
                    if result is None:
                        continue
                    pixels, fraction = result
                    record = TileRecord(pixels, tile.col, tile.row, tile.x, tile.y, fraction)
                    writer.write(tile_example_parts(record, labels))
                    kept.append([tile.col, tile.row])
                if writer.count:
                    writer.commit()
                info = {
                    **base,
                    "shard": path.name if writer.count else "",
                    "tile_count": writer.count,
                    "candidates": len(task.tiles),
                    "size_bytes": writer.size,
                    "crc32c": writer.crc32c if writer.count else "",
                    "kept": kept,
                    "seconds": round(time.perf_counter() - start, 4),
                }
            write_marker(
                self.tiles_root,
                task.slide_id,
                task.spec.spec_hash,
                task.batch_index,
                task.batch_count,
                info,
            )
            return {**info, "path": str(path) if writer.count else ""}
        except SlideError as exc:
            return {**base, "error": str(exc)}
        except Exception as exc:  # a corrupt tile mid-slide, a full disk, ...
            return {**base, "error": f"{type(exc).__name__}: {exc}"}
