"""`prolifscore ingest`: publish slides to prolif.slides.ingest and optionally follow them."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prolifscore.cli.labels import labels_for, read_labels
from prolifscore.cli.slidefiles import DEFAULT_PATTERNS, find_slides
from prolifscore.core.runtime import tracing
from prolifscore.core.runtime.bus import BrokerUnavailable, Bus
from prolifscore.core.runtime.events import SlideEvents
from prolifscore.core.runtime.settings import KafkaSettings, PreprocessSettings, load
from prolifscore.core.runtime.validation import (
    InvalidInput,
    check_id,
    id_from_name,
    validate_ingest,
)
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
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="slide files, or folders searched recursively for files matching --pattern",
    )
    p.add_argument(
        "--pattern",
        action="append",
        help="file-name glob for folders, repeatable (default: "
        + " ".join(DEFAULT_PATTERNS)
        + "; case-insensitive)",
    )
    p.add_argument("--labels", type=Path, help="TUPAC16 ground-truth CSV (row i = slide i)")
    p.add_argument(
        "--wait", action="store_true", help="follow status events until every slide is done"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="--wait gives up after this many seconds"
    )
    p.add_argument(
        "--broker-timeout",
        type=float,
        default=30.0,
        help="--wait gives up (exit code 3) when the broker is unreachable this long",
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
        msg = pb.SlideIngest(
            slide_id=id_from_name(path.stem), path=str(path.resolve()), run_id=run_id
        )
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
    """Publish the slides, keyed by slide id; returns once the broker has them all. With
    tracing on, each slide's record starts its trace (tiling and filtering continue it)."""
    k = bus.settings
    bus.ensure_topics([k.topic_ingest, k.topic_status])
    for m in msgs:
        attributes = {"prolif.slide_id": m.slide_id, "prolif.run_id": m.run_id}
        with tracing.span("ingest slide", kind="producer", **attributes):
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


class BrokerLost(RuntimeError):
    """The broker became unreachable for too long, or came back without the records the slides'
    work depended on (an in-memory broker restarted): following cannot end well."""


class BrokerCheck:
    """While following: is the broker still there, and still the one that holds our topics?

    A topic that vanished or came back with another id means the broker lost its records (an
    in-memory broker restarted empty): the slides' queued work is gone and would be waited for
    in vain. A broker that stays unreachable for `grace_s` is given up on too."""

    def __init__(self, bus: Bus, topics: Sequence[str], grace_s: float, every_s: float = 2.0):
        self.bus = bus
        self.topics = list(topics)
        self.grace_s = grace_s
        self.every_s = every_s
        self.ids: dict[str, str] | None = None  # learnt at the first answer
        self.down_since: float | None = None
        self.next = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.every_s
        broker = self.bus.settings.bootstrap_servers
        try:
            ids = self.bus.topic_ids(self.topics, timeout=self.every_s)
        except BrokerUnavailable:
            self.down_since = self.down_since or now
            if now - self.down_since >= self.grace_s:
                raise BrokerLost(
                    f"Kafka broker {broker} unreachable for {now - self.down_since:.0f} s; "
                    "giving up (is `prolifscore up` running? see `prolifscore status`)"
                ) from None
            return
        self.down_since = None
        if self.ids is None:
            self.ids = ids
        changed = sorted(t for t in self.topics if ids.get(t) != self.ids.get(t))
        if changed:
            raise BrokerLost(
                f"Kafka broker {broker} lost its records (topics {', '.join(changed)} are gone "
                "or new: it restarted without durable storage); the queued work of these slides "
                "is lost: ingest them again"
            )


def follow(
    bus: Bus,
    settings: KafkaSettings,
    run_id: str,
    slide_ids: list[str],
    timeout: float,
    broker_grace_s: float = 30.0,
) -> dict[str, SlideProgress]:
    """Read status events of this run until every slide is FILTERED or FAILED. Repeated events
    (at-least-once delivery) count once. Raises BrokerLost if the broker stays unreachable for
    `broker_grace_s` or loses the records of these slides."""
    from tqdm import tqdm

    from prolifscore.core.runtime.codec import DecodeError, decode

    progress = {s: SlideProgress() for s in slide_ids}
    view = SlideEvents()
    check = BrokerCheck(bus, [settings.topic_ingest, settings.topic_status], broker_grace_s)
    consumer = bus.consumer([settings.topic_status], f"prolifscore-cli-{run_id}")
    bar = tqdm(total=0, unit="batch", desc="filtering", file=sys.stderr, dynamic_ncols=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not all(p.finished for p in progress.values()):
            check.check()
            for record in consumer.poll(timeout_ms=500):
                try:
                    ev = decode(record.value, record.headers, pb.SlideStatus)
                except DecodeError:
                    continue
                p = progress.get(ev.slide_id)
                if ev.run_id != run_id or p is None or p.finished or not view.add(ev):
                    continue
                _apply(p, ev, bar)
    finally:
        bar.close()
        consumer.close()
    return progress


def _apply(p: SlideProgress, ev: pb.SlideStatus, bar: Any) -> None:
    """One new (not repeated) event of a slide still in progress."""
    if ev.stage == pb.STAGE_TILED:
        p.stage, p.candidates, p.batches = "tiled", ev.candidate_tiles, ev.batch_count
        p.warnings = list(ev.warnings)
        bar.total += ev.batch_count
    elif ev.stage in (pb.STAGE_FILTERING, pb.STAGE_FILTERED) and ev.batch_index not in p.done:
        p.done.add(ev.batch_index)
        bar.update(1)
    if ev.stage == pb.STAGE_FILTERED:
        p.stage, p.kept, p.manifest = "filtered", ev.kept_tiles, ev.manifest_path
        bar.update(max(0, p.batches - len(p.done)))
    elif ev.stage == pb.STAGE_FAILED:
        p.stage, p.reason = "failed", ev.reason
    bar.refresh()


def prepare(args: argparse.Namespace, run_id: str) -> tuple[list[pb.SlideIngest], int]:
    """The messages for the readable slides, and how many paths could not be sent (each
    reported on stderr). Raises InvalidInput for options the services would refuse, RoiError
    for unusable regions of interest."""
    check_id("--run-id", run_id)
    found = find_slides(args.paths, args.pattern or DEFAULT_PATTERNS)
    for path, why in found.problems:
        print(f"not sent: {path}: {why}", file=sys.stderr)
    msgs = build_messages(
        found.files,
        run_id,
        labels=args.labels,
        tissue_mode=args.tissue_mode,
        stain=args.stain,
        max_tiles=args.max_tiles,
        roi_path=args.roi,
    )
    for msg in msgs:
        try:
            validate_ingest(msg)
        except InvalidInput as exc:
            raise InvalidInput(f"slide {msg.slide_id}:", str(exc)) from exc
    return msgs, len(found.problems)


def run(args: argparse.Namespace) -> int:
    """Exit code 0 when every path was sent (and with --wait, filtered); 1 when a path could
    not be sent or a slide failed (the others are still sent); 2 for invalid options; 3 when
    --wait lost the broker (unreachable too long, or restarted without the slides' records)."""
    overrides = {"bootstrap_servers": args.bootstrap} if args.bootstrap else {}
    settings = load(KafkaSettings, **overrides)
    run_id = args.run_id or uuid.uuid4().hex[:12]
    try:
        msgs, problems = prepare(args, run_id)
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except roi.RoiError as exc:
        print(f"error: regions of interest: {exc}", file=sys.stderr)
        return 2
    if args.roi is not None:
        with_rois = sum(1 for m in msgs if m.rois)
        print(f"regions of interest for {with_rois} of {len(msgs)} slide(s)", file=sys.stderr)
    unsent = f"; {problems} path(s) not sent (listed above)" if problems else ""
    if not msgs:
        print(f"nothing to publish{unsent}", file=sys.stderr)
        return 1
    bus = Bus(settings, "cli")
    try:
        publish_slides(bus, msgs)
        print(f"published {len(msgs)} slide(s), run id {run_id}{unsent}", file=sys.stderr)
        if not args.wait:
            return 1 if problems else 0
        ids = [m.slide_id for m in msgs]
        progress = follow(bus, settings, run_id, ids, args.timeout, args.broker_timeout)
    except (BrokerLost, BrokerUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        bus.close()
    print(f"{'slide':<32} {'stage':<9} {'candidates':>10} {'kept':>6}  note")
    for slide_id, p in progress.items():
        note = p.reason or "; ".join(p.warnings) or p.manifest
        print(f"{slide_id:<32} {p.stage:<9} {p.candidates:>10} {p.kept:>6}  {note}")
    ok = not problems and all(p.stage == "filtered" for p in progress.values())
    return 0 if ok else 1
