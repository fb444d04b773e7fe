"""`prolifscore ingest`: publish slides to prolif.slides.ingest and optionally follow them."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prolifscore.cli.labels import labels_for, read_labels
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.settings import KafkaSettings, PreprocessSettings, load
from prolifscore.core.wsi import roi
from prolifscore.core.wsi.split import VALIDATION, stratified_splits
from prolifscore.v1 import pipeline_pb2 as pb

_MODES = {"fast": pb.TISSUE_MODE_FAST, "seed": pb.TISSUE_MODE_SEED}
_STAINS = {
    "none": pb.STAIN_NORMALIZATION_NONE,
    "macenko": pb.STAIN_NORMALIZATION_MACENKO,
    "reinhard": pb.STAIN_NORMALIZATION_REINHARD,
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ingest", help="publish slides for preprocessing")
    p.add_argument("paths", nargs="+", type=Path, help="slide files")
    p.add_argument("--labels", type=Path, help="TUPAC16 ground-truth CSV (row i = slide i)")
    p.add_argument(
        "--wait", action="store_true", help="follow status events until every slide is done"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="--wait gives up after this many seconds"
    )
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: PROLIF_KAFKA_BOOTSTRAP)")
    p.add_argument("--run-id", default="", help="tag carried by every event of these slides")
    p.add_argument("--tissue-mode", choices=sorted(_MODES))
    p.add_argument("--stain", choices=sorted(_STAINS))
    p.add_argument("--max-tiles", type=int)
    p.add_argument(
        "--roi",
        type=Path,
        help="regions of interest (level-0 pixels): a GeoJSON or TUPAC16 x,y,w,h CSV file for "
        "one slide, or a folder of per-slide files (<slide>-ROI.csv, <slide>.geojson)",
    )
    p.set_defaults(func=run)


def rois_for(paths: Sequence[Path], where: Path | None) -> dict[Path, list[pb.Polygon]]:
    """Each slide's regions of interest: one file for a single slide, or each slide's own file
    in a folder (slides without one are tiled whole). Raises RoiError."""
    if where is None:
        return {}
    if not where.is_dir():
        if len(paths) != 1:
            raise roi.RoiError(f"{where} is one file for {len(paths)} slides: give a folder")
        return {paths[0]: roi.read_file(where)}
    found = {p: roi.file_for(where, p.stem) for p in paths}
    return {p: roi.read_file(f) for p, f in found.items() if f is not None}


def build_messages(
    paths: Sequence[Path],
    run_id: str,
    *,
    labels: Path | None = None,
    tissue_mode: str | None = None,
    stain: str | None = None,
    max_tiles: int | None = None,
    roi_path: Path | None = None,
) -> list[pb.SlideIngest]:
    """One ingest message per slide (id = file stem), with its labels from the ground-truth
    CSV, its regions of interest (`rois_for`) and the tiling options given; with labels, an
    exact stratified train/validation split. Raises RoiError."""
    by_key = read_labels(labels) if labels else {}
    rois = rois_for(paths, roi_path)
    pre = load(PreprocessSettings)
    msgs = []
    for path in paths:
        msg = pb.SlideIngest(slide_id=path.stem, path=str(path.resolve()), run_id=run_id)
        found = labels_for(path.stem, by_key) if by_key else None
        if found:
            msg.labels.tumor_score = found[0]
            if found[1] is not None:
                msg.labels.molecular_score = found[1]
        if tissue_mode:
            msg.spec.tissue_mode = _MODES[tissue_mode]
        if stain:
            msg.spec.stain_normalization = _STAINS[stain]
        if max_tiles is not None:
            msg.spec.max_tiles = max_tiles
        msg.rois.extend(rois.get(path, []))
        msgs.append(msg)
    if by_key:  # the CLI sees the whole set: an exact stratified split
        splits = stratified_splits(
            [
                (m.slide_id, m.labels.tumor_score if m.labels.HasField("tumor_score") else None)
                for m in msgs
            ],
            pre.split_seed,
            pre.validation_fraction,
        )
        for m in msgs:
            m.split = pb.SPLIT_VALIDATION if splits[m.slide_id] == VALIDATION else pb.SPLIT_TRAIN
    return msgs


def publish_slides(bus: Bus, msgs: Iterable[pb.SlideIngest]) -> None:
    """Publish the slides, keyed by slide id; returns once the broker has them all."""
    k = bus.settings
    bus.ensure_topics([k.topic_ingest, k.topic_status])
    for m in msgs:
        bus.publish(k.topic_ingest, m.slide_id, m)
    bus.flush()


@dataclass
class SlideProgress:
    stage: str = "queued"
    candidates: int = 0
    kept: int = 0
    batches: int = 0
    done: set[int] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    reason: str = ""
    manifest: str = ""

    @property
    def finished(self) -> bool:
        return self.stage in ("filtered", "failed")


def follow(
    bus: Bus, settings: KafkaSettings, run_id: str, slide_ids: list[str], timeout: float
) -> dict[str, SlideProgress]:
    """Read status events of this run until every slide is FILTERED or FAILED."""
    from tqdm import tqdm

    from prolifscore.core.runtime.codec import DecodeError, decode

    progress = {s: SlideProgress() for s in slide_ids}
    consumer = bus.consumer([settings.topic_status], f"prolifscore-cli-{run_id}")
    bar = tqdm(total=0, unit="batch", desc="filtering", file=sys.stderr, dynamic_ncols=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not all(p.finished for p in progress.values()):
            for record in consumer.poll(timeout_ms=500):
                try:
                    ev = decode(record.value, record.headers, pb.SlideStatus)
                except DecodeError:
                    continue
                p = progress.get(ev.slide_id)
                if ev.run_id != run_id or p is None or p.finished:
                    continue
                if ev.stage == pb.STAGE_TILED:
                    p.stage, p.candidates, p.batches = "tiled", ev.candidate_tiles, ev.batch_count
                    p.warnings = list(ev.warnings)
                    bar.total += ev.batch_count
                elif (
                    ev.stage in (pb.STAGE_FILTERING, pb.STAGE_FILTERED)
                    and ev.batch_index not in p.done
                ):
                    p.done.add(ev.batch_index)
                    bar.update(1)
                if ev.stage == pb.STAGE_FILTERED:
                    p.stage, p.kept, p.manifest = "filtered", ev.kept_tiles, ev.manifest_path
                    bar.update(max(0, p.batches - len(p.done)))
                elif ev.stage == pb.STAGE_FAILED:
                    p.stage, p.reason = "failed", ev.reason
                bar.refresh()
    finally:
        bar.close()
        consumer.close()
    return progress


def run(args: argparse.Namespace) -> int:
    overrides = {"bootstrap_servers": args.bootstrap} if args.bootstrap else {}
    settings = load(KafkaSettings, **overrides)
    run_id = args.run_id or uuid.uuid4().hex[:12]
    try:
        msgs = build_messages(
            args.paths,
            run_id,
            labels=args.labels,
            tissue_mode=args.tissue_mode,
            stain=args.stain,
            max_tiles=args.max_tiles,
            roi_path=args.roi,
        )
    except roi.RoiError as exc:
        print(f"error: regions of interest: {exc}", file=sys.stderr)
        return 2
    if args.roi is not None:
        with_rois = sum(1 for m in msgs if m.rois)
        print(f"regions of interest for {with_rois} of {len(msgs)} slide(s)", file=sys.stderr)
    bus = Bus(settings, "cli")
    try:
        publish_slides(bus, msgs)
        print(f"published {len(msgs)} slide(s), run id {run_id}", file=sys.stderr)
        if not args.wait:
            return 0
        progress = follow(bus, settings, run_id, [m.slide_id for m in msgs], args.timeout)
    finally:
        bus.close()
    print(f"{'slide':<32} {'stage':<9} {'candidates':>10} {'kept':>6}  note")
    for slide_id, p in progress.items():
        note = p.reason or "; ".join(p.warnings) or p.manifest
        print(f"{slide_id:<32} {p.stage:<9} {p.candidates:>10} {p.kept:>6}  {note}")
    return 0 if all(p.stage == "filtered" for p in progress.values()) else 1
