"""Scoring one slide: tile and filter with the preprocessing library, send batches of uint8
tiles to the model server while the next batch is being read, aggregate, grade mitoses, draw
the heatmap. Used by the gRPC API, Kafka batch scoring and `prolifscore score --local` alike."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prolifscore.core.grading.evaluation import slide_decision
from prolifscore.core.grading.mitoses import (
    MitosisGrading,
    densest_region,
    non_max_suppression,
    tile_detections,
)
from prolifscore.core.models.contract import MITOSIS_OUTPUT, TUMOR_MOLECULAR_OUTPUT, TUMOR_OUTPUT
from prolifscore.core.models.export import read_metadata
from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.core.runtime.validation import InvalidInput, validate_score_request
from prolifscore.core.wsi.prefetch import prefetched_iter
from prolifscore.core.wsi.preprocess import SlidePlan, SpecError, TileSource, plan_slide
from prolifscore.core.wsi.slide import Slide, confine_path, open_slide
from prolifscore.scoring import heatmap
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb

if TYPE_CHECKING:  # not at run time: Ray workers import this module to read tiles, and
    # model_client pulls in TensorFlow (5-7 s and ~600 MB per worker).
    from prolifscore.scoring.model_client import Models

log = logging.getLogger(__name__)

Batch = tuple[list[pb.Tile], np.ndarray]
Batches = Generator[Batch, None, None]
# Ray readers pay off only with several batches per reader; below this, a local thread wins.
RAY_MIN_BATCHES_PER_READER = 4


class InvalidRequest(ValueError):
    pass


class Cancelled(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


@dataclass(frozen=True)
class ScoringOptions:
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    tumor_model: str = "resnet50"
    mitosis_model: str = "mitosis"
    tumor_label: str = ""  # version labels: ScoreRequest.model_label overrides the tumor one
    mitosis_label: str = ""
    predict_batch: int = 32
    aggregation: int = spb.AGGREGATION_MEAN_PROBABILITY
    score_rule: int = spb.SCORE_RULE_UNSPECIFIED  # the model's own: cut points when exported
    grading: MitosisGrading = field(default_factory=MitosisGrading)
    pipelined: bool = True  # read the next batch while the model server predicts this one
    ray_readers: int = 0  # > 0: read candidate chunks in that many parallel Ray tasks
    metadata_root: str = ""  # the served models' root: exported thresholds, untrained flags


@dataclass
class _Progress:
    found: int = 0
    read: int = 0
    kept: int = 0
    scored: int = 0

    def event(self) -> spb.ScoreProgress:
        return spb.ScoreProgress(
            tiles_found=self.found,
            tiles_read=self.read,
            tiles_kept=self.kept,
            tiles_scored=self.scored,
        )


def _read_local(
    source: TileSource, candidates: list[pb.Tile], batch: int, counts: _Progress
) -> Batches:
    tiles: list[pb.Tile] = []
    pixels: list[np.ndarray] = []
    for tile in candidates:
        result = source.process(tile)
        counts.read += 1
        if result is not None:
            tiles.append(tile)
            pixels.append(result[0])
            counts.kept += 1
        if len(tiles) == batch:
            yield tiles, np.stack(pixels)
            tiles, pixels = [], []
    if tiles:
        yield tiles, np.stack(pixels)


def _read_chunk(
    path: str, spec: bytes, stain: bytes, tiles: list[bytes]
) -> tuple[list[int], np.ndarray | None]:
    """Ray task: open the slide once for the chunk, return the kept tiles' indices and pixels."""
    with open_slide(path) as slide:
        source = TileSource(slide, pb.ResolvedSpec.FromString(spec), pb.StainFit.FromString(stain))
        kept, pixels = [], []
        for i, raw in enumerate(tiles):
            result = source.process(pb.Tile.FromString(raw))
            if result is not None:
                kept.append(i)
                pixels.append(result[0])
    return kept, (np.stack(pixels) if pixels else None)


def _read_ray(
    path: Path,
    plan_spec: pb.ResolvedSpec,
    stain: pb.StainFit,
    candidates: list[pb.Tile],
    batch: int,
    readers: int,
    counts: _Progress,
) -> Batches:
    import ray

    remote = ray.remote(num_cpus=1)(_read_chunk)
    chunks = [candidates[i : i + batch] for i in range(0, len(candidates), batch)]
    spec_b, stain_b = plan_spec.SerializeToString(), stain.SerializeToString()
    pending: dict[object, list[pb.Tile]] = {}
    next_chunk = 0
    while next_chunk < len(chunks) or pending:
        while next_chunk < len(chunks) and len(pending) < readers:
            chunk = chunks[next_chunk]
            ref = remote.remote(str(path), spec_b, stain_b, [t.SerializeToString() for t in chunk])
            pending[ref] = chunk
            next_chunk += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        chunk = pending.pop(done[0])
        kept, pixels = ray.get(done[0])
        counts.read += len(chunk)
        counts.kept += len(kept)
        if pixels is not None:
            yield [chunk[i] for i in kept], pixels


@dataclass
class _SlideRun:
    """One slide's scoring, aggregated as the batches come (`add`) and turned into the
    SlideScore by `_assemble`. Its state does not grow with the slide's tiles: sums and
    counts, the heatmap canvas (thumbnail-sized), and the mitosis detections; per-tile rows
    only when the request asks for the tiles (they are then part of the answer)."""

    request: spb.ScoreRequest
    slide_id: str
    plan: SlidePlan
    options: ScoringOptions
    started: float  # perf_counter at the request's start
    timings: spb.ScoreTimings = field(default_factory=spb.ScoreTimings)
    count: int = 0  # tiles scored
    prob_sum: np.ndarray | None = None  # [K] float64: sum of the tiles' class probabilities
    class_counts: np.ndarray | None = None  # [K]: tiles whose most probable class is k + 1
    detections: list[tuple[float, float, float]] = field(default_factory=list)  # x0, y0, p
    versions: dict[str, int] = field(default_factory=dict)  # model -> version that answered
    molecular: bool = False  # the served version has a trained molecular head
    molecular_sum: float = 0.0
    rows: list[spb.TilePrediction] = field(default_factory=list)  # only with include_tiles
    canvas: heatmap.Canvas | None = None  # only with include_heatmap

    def predict(
        self, models: Models, tiles: list[pb.Tile], pixels: np.ndarray, timeout: float | None
    ) -> None:
        """Both models on one batch; mitosis detections in level-0 coordinates."""
        started, options = time.perf_counter(), self.options
        label = self.request.model_label or options.tumor_label
        values = None
        if self.molecular:  # the served version has a trained molecular head: one call, both
            out, version = models.predict_many(
                options.tumor_model, pixels, (TUMOR_OUTPUT, TUMOR_MOLECULAR_OUTPUT), timeout, label
            )
            probs, values = out[TUMOR_OUTPUT], out[TUMOR_MOLECULAR_OUTPUT]
        else:
            probs, version = models.predict(
                options.tumor_model, pixels, TUMOR_OUTPUT, timeout, label
            )
            if not self.count and molecular_head(options, version):  # known after 1st answer
                values, _ = models.predict(
                    options.tumor_model, pixels, TUMOR_MOLECULAR_OUTPUT, timeout, label
                )
                self.molecular = True
        self.versions[options.tumor_model] = version
        maxima: list[float] = []
        if not self.request.skip_mitosis:
            maps, version = models.predict(
                options.mitosis_model, pixels, MITOSIS_OUTPUT, timeout, options.mitosis_label
            )
            self.versions[options.mitosis_model] = version
            threshold = mitosis_threshold(options, version)
            for tile, m in zip(tiles, maps, strict=True):
                maxima.append(float(m.max()) if m.size else 0.0)
                self.detections.extend(tile_detections(m, tile, self.plan.spec, threshold))
        self.timings.predict_s += time.perf_counter() - started
        self.add(tiles, np.asarray(probs, np.float32), maxima, values)

    def add(
        self,
        tiles: list[pb.Tile],
        probs: np.ndarray,
        mitosis_max: list[float],
        molecular: np.ndarray | None = None,
    ) -> None:
        """One batch's answers into the running sums, the canvas and (when asked) the rows."""
        if self.prob_sum is None:
            k = probs.shape[1]
            self.prob_sum, self.class_counts = np.zeros(k), np.zeros(k, np.int64)
            if self.request.include_heatmap:
                cover = self.plan.coverage
                self.canvas = heatmap.Canvas(
                    cover.thumbnail, cover.downsample, self.plan.spec.footprint0, k, cover.offset
                )
        assert self.class_counts is not None
        self.prob_sum += probs.sum(axis=0, dtype=np.float64)
        self.class_counts += np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        if molecular is not None:
            self.molecular_sum += float(np.asarray(molecular, np.float64).sum())
        self.count += len(tiles)
        for i, t in enumerate(tiles):
            if self.canvas is not None:
                self.canvas.add(t, probs[i].tolist())
            if self.request.include_tiles:
                self.rows.append(
                    spb.TilePrediction(
                        col=t.col,
                        row=t.row,
                        x=t.x,
                        y=t.y,
                        probabilities=probs[i].tolist(),
                        mitosis_max=mitosis_max[i] if mitosis_max else 0.0,
                    )
                )


def _reader(
    slide: Slide, path: Path, plan: SlidePlan, options: ScoringOptions, counts: _Progress
) -> Batches:
    """Batches of kept tiles: Ray reader tasks where the slide has enough candidates for them
    to pay off, else this process."""
    batch, readers = options.predict_batch, options.ray_readers
    if readers > 0 and len(plan.candidates) >= RAY_MIN_BATCHES_PER_READER * batch * readers:
        return _read_ray(path, plan.spec, plan.stain, plan.candidates, batch, readers, counts)
    return _read_local(TileSource(slide, plan.spec, plan.stain), plan.candidates, batch, counts)


def _time_left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (epoch seconds), the timeout of the next model call."""
    if deadline is None:
        return None
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded while scoring")
    return left


def score_slide(
    request: spb.ScoreRequest,
    *,
    slide_roots: tuple[str, ...],
    options: ScoringOptions,
    models: Models,
    progress: Callable[[spb.ScoreProgress], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    deadline: float | None = None,
) -> spb.SlideScore:
    """Raises InvalidRequest (the request breaks an input rule of `validation.py` or asks for
    an impossible spec), SlideError subclasses, ModelUnavailable / ModelError, Cancelled,
    DeadlineExceeded; everything else is a bug."""
    start = time.perf_counter()
    try:
        validate_score_request(request)
    except InvalidInput as exc:
        raise InvalidRequest(str(exc)) from exc
    path = confine_path(request.path, slide_roots)
    slide_id = request.slide_id or path.stem
    counts = _Progress()
    notify = progress or (lambda _e: None)
    with open_slide(path) as slide:
        try:
            plan = plan_slide(slide, slide_id, request.spec, options.preprocess, request.rois)
        except SpecError as exc:
            raise InvalidRequest(str(exc)) from exc
        run = _SlideRun(request, slide_id, plan, options, start)
        run.timings.tiling_s = time.perf_counter() - start
        counts.found = len(plan.candidates)
        notify(counts.event())
        reader = _reader(slide, path, plan, options, counts)
        # Pipelined: the next batch is read while the model server predicts this one. Closed
        # before the slide is: no read is left running.
        batches = prefetched_iter(reader, 2, "score-reader") if options.pipelined else reader
        with closing(batches):
            for batch_tiles, pixels in batches:
                if cancelled():
                    raise Cancelled("client cancelled the request")
                run.predict(models, batch_tiles, pixels, _time_left(deadline))
                counts.scored = run.count
                notify(counts.event())
    return _assemble(run)


@functools.lru_cache(maxsize=64)
def _export_metadata(root: str, model: str, version: int) -> dict[str, Any]:
    """A served version's export metadata ({} when absent or unreadable). Versions are
    immutable, so each is read once."""
    try:
        return read_metadata(Path(root) / model / str(version))
    except (OSError, ValueError) as exc:
        log.warning("cannot read model metadata", extra={"model": model, "error": str(exc)})
        return {}


def model_metadata(options: ScoringOptions, model: str, version: int) -> dict[str, Any]:
    return _export_metadata(options.metadata_root, model, version) if options.metadata_root else {}


def mitosis_threshold(options: ScoringOptions, version: int) -> float:
    """The served detector's own operating point (its export metadata) where the model root
    is readable, else the configured threshold."""
    meta = model_metadata(options, options.mitosis_model, version)
    return float(meta.get("threshold", options.grading.threshold))


def molecular_head(options: ScoringOptions, version: int) -> bool:
    """Whether the served tumor model version has a trained molecular-score head (its export
    metadata; unknown without the model root, so then no molecular score is reported)."""
    head = model_metadata(options, options.tumor_model, version).get("molecular_head")
    return bool(head and head.get("trained"))


def score_rule(request: spb.ScoreRequest, options: ScoringOptions) -> int:
    """The rule asked for: the request's, else the seed's rounded mean where the request or
    the service asks for that aggregation, else the model's own (cut points when it has
    them)."""
    if request.score_rule:
        return request.score_rule
    aggregation = request.aggregation or options.aggregation
    if aggregation == spb.AGGREGATION_ROUNDED_MEAN_CLASS:
        return spb.SCORE_RULE_ROUNDED_MEAN
    return options.score_rule


def cutpoints(meta: dict[str, Any]) -> list[float] | None:
    """The ordinal cut points an export carries (`score_rule.cutpoints`, or the older
    `slide_cutpoints`), else None."""
    rule = meta.get("score_rule") or {}
    cuts = rule.get("cutpoints") if isinstance(rule, dict) else None
    return cuts if cuts else meta.get("slide_cutpoints") or None


FUSION = (
    "mean of the tumor model's proliferation index and the mitotic score, "
    "cut at 1.5 and 2.5 (equal weights)"
)


def fuse(proliferation_index: float, mitotic_score: int) -> int:
    """The slide's score from both routes: the tumor model's continuous index (1..3) and the
    mitotic grade (1..3) weigh the same; `FUSION` says so in each result."""
    mean = (proliferation_index + mitotic_score) / 2
    return 1 + int(mean >= 1.5) + int(mean >= 2.5)


def _tumor_score(run: _SlideRun, result: spb.SlideScore) -> None:
    """Class probabilities, the class under the score rule, the proliferation index and the
    molecular score (when the model has that head), from the run's sums."""
    assert run.prob_sum is not None and run.class_counts is not None
    mean = run.prob_sum / run.count
    probabilities = mean / mean.sum()
    result.probabilities.extend(probabilities.tolist())
    rule = score_rule(run.request, run.options)
    version = run.versions.get(run.options.tumor_model)
    cuts = cutpoints(model_metadata(run.options, run.options.tumor_model, version or 0))
    # Each tile's class, rebuilt from the counts (one byte a tile, only for this call).
    classes = np.repeat(np.arange(1, len(mean) + 1, dtype=np.int8), run.class_counts)
    result.tumor_score, result.score_rule, result.proliferation_index = slide_decision(
        probabilities, classes, rule, cuts
    )
    if rule == spb.SCORE_RULE_CUTPOINTS and result.score_rule != rule:
        result.warnings.append(
            "the served tumor model has no cut points (or its export metadata is not "
            "readable here): scored by argmax"
        )
    if run.molecular:
        result.molecular_score = run.molecular_sum / run.count


def _assemble(run: _SlideRun) -> spb.SlideScore:
    request, options, plan = run.request, run.options, run.plan
    aggregation = request.aggregation or options.aggregation
    result = spb.SlideScore(
        request_id=request.request_id or uuid.uuid4().hex,
        slide_id=run.slide_id,
        aggregation=aggregation,
        tiles_total=run.count,
        tiles_scored=run.count,
        warnings=plan.warnings,
        spec_hash=plan.spec.spec_hash,
        models=[spb.ModelVersion(name=n, version=v) for n, v in sorted(run.versions.items())],
    )
    if run.count:
        _tumor_score(run, result)
    else:
        result.warnings.append("no tissue tile was found: no score")
    for name, version in sorted(run.versions.items()):
        if model_metadata(options, name, version).get("trained") is False:
            result.warnings.append(
                f"model {name} v{version} is untrained (random initialisation): "
                "this is not a real score"
            )
    if not request.skip_mitosis:
        _grade_mitoses(run, result)
        if result.tumor_score and result.mitotic_score:
            result.fused_score = fuse(result.proliferation_index, result.mitotic_score)
            result.fusion = FUSION
    if request.include_tiles:
        _add_tiles(run, result)
    if request.include_heatmap:
        mitoses = [(m.x, m.y) for m in result.mitoses]
        if run.canvas is None:  # no tile: the thumbnail alone
            cover = plan.coverage
            run.canvas = heatmap.Canvas(cover.thumbnail, cover.downsample, 1, 1, cover.offset)
        predicted = min((result.tumor_score or 1) - 1, len(run.canvas.overlays) - 1)
        result.heatmap_png = run.canvas.png(predicted, mitoses)
    timings = run.timings
    elapsed = time.perf_counter() - run.started
    timings.reading_s = max(0.0, elapsed - timings.tiling_s - timings.predict_s)
    timings.total_s = time.perf_counter() - run.started
    result.timings.CopyFrom(timings)
    return result


def _grade_mitoses(run: _SlideRun, result: spb.SlideScore) -> None:
    """Detections -> mitoses (NMS), the densest region's count and the mitotic score."""
    options, mpp0 = run.options, run.plan.geometry.base_mpp
    if options.mitosis_model in run.versions:
        result.mitosis_threshold = mitosis_threshold(options, run.versions[options.mitosis_model])
    kept = non_max_suppression(run.detections, options.grading.nms_radius_um / mpp0)
    result.mitosis_count = len(kept)
    result.mitoses.extend(spb.Mitosis(x=round(x), y=round(y), probability=p) for x, y, p in kept)
    side0 = options.grading.region_side_um() / mpp0
    square = densest_region([(x, y) for x, y, _ in kept], side0)
    densest = square.count if square else 0
    if square:
        result.densest_region.CopyFrom(square.as_region())
    result.mitoses_per_10hpf = float(densest)
    result.mitotic_score = options.grading.mitotic_score(densest) if run.count else 0


def _add_tiles(run: _SlideRun, result: spb.SlideScore) -> None:
    """Per-tile predictions; a mitosis counts for the grid cell it falls in (the first tile
    covering it, with overlap)."""
    per_tile: dict[tuple[int, int], int] = {}
    stride = run.plan.spec.stride0
    for m in result.mitoses:
        key = (int(m.x // stride), int(m.y // stride))
        per_tile[key] = per_tile.get(key, 0) + 1
    for row in run.rows:
        row.mitoses = per_tile.get((row.col, row.row), 0)
    result.tiles.extend(run.rows)
