"""Per-slide tiling work, run as a Ray task: open, plan, cut into tile tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.core.runtime.validation import InvalidInput, validate_ingest
from prolifscore.core.wsi.preprocess import SpecError, plan_slide, tile_tasks
from prolifscore.core.wsi.slide import SlideError, confine_path, open_slide
from prolifscore.core.wsi.split import VALIDATION, hash_split
from prolifscore.core.wsi.stain import StainFitError
from prolifscore.v1 import pipeline_pb2 as pb


@dataclass
class TilingOutcome:
    """Serialized messages to publish (picklable, small: references only)."""

    slide_id: str
    tasks: list[bytes] = field(default_factory=list)
    status: bytes = b""
    error: str = ""
    candidates: int = 0


def tile_slide(
    ingest_bytes: bytes, slide_roots: tuple[str, ...], defaults: PreprocessSettings
) -> TilingOutcome:
    msg = pb.SlideIngest.FromString(ingest_bytes)
    start = time.perf_counter()
    try:
        validate_ingest(msg)
        path = confine_path(msg.path, slide_roots)
        with open_slide(path) as slide:
            plan = plan_slide(slide, msg.slide_id, msg.spec, defaults, msg.rois)
    except (InvalidInput, SlideError, SpecError, StainFitError) as exc:
        return TilingOutcome(slide_id=msg.slide_id, error=str(exc))
    split = msg.split
    if split == pb.SPLIT_UNSPECIFIED:
        score = msg.labels.tumor_score if msg.labels.HasField("tumor_score") else None
        name = hash_split(msg.slide_id, score, defaults.split_seed, defaults.validation_fraction)
        split = pb.SPLIT_VALIDATION if name == VALIDATION else pb.SPLIT_TRAIN
    tasks = tile_tasks(
        plan,
        msg.slide_id,
        path,
        defaults.batch_size,
        labels=msg.labels,
        split=split,
        run_id=msg.run_id,
    )
    status = pb.SlideStatus(
        slide_id=msg.slide_id,
        stage=pb.STAGE_TILED,
        service="tiling",
        warnings=plan.warnings,
        candidate_tiles=len(plan.candidates),
        batch_count=len(tasks),
        duration_s=time.perf_counter() - start,
        path=str(path),
        run_id=msg.run_id,
    )
    status.time.GetCurrentTime()
    return TilingOutcome(
        slide_id=msg.slide_id,
        tasks=[task.SerializeToString() for task in tasks],
        status=status.SerializeToString(),
        candidates=len(plan.candidates),
    )
