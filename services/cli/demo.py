"""`prolifscore demo`: the main job on the embedded runtime, from nothing to tiles.

Starts the broker, Ray and the services on 127.0.0.1, ingests the shared real slides over
Kafka, follows them to the end with a progress bar, prints a table, writes a run manifest,
and stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from prolifscore.cli.ingest import follow
from prolifscore.core.bus import Bus
from prolifscore.core.embedded import EmbeddedStack
from prolifscore.core.settings import KafkaSettings, load
from prolifscore.v1 import pipeline_pb2 as pb


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the pipeline end to end on the embedded runtime")
    p.add_argument(
        "--slides",
        type=Path,
        default=Path(os.environ.get("PROLIF_DEMO_SLIDES", "../shared/data/slides")),
        help="folder of slides to ingest (default: ../shared/data/slides)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=run)


def demo_slides(folder: Path) -> list[pb.SlideIngest]:
    """Every slide file in `folder`; the kidney macro image gets a spec that fits its speck of
    tissue, and the broken file stays in to show how a failure is reported."""
    msgs = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn"):
            continue
        msg = pb.SlideIngest(slide_id=path.stem, path=str(path.resolve()))
        if path.stem.startswith("kidney"):
            msg.spec.tile_size, msg.spec.target_mpp, msg.spec.tissue_threshold = 32, 0.25, 0.5
        msgs.append(msg)
    return msgs


def run(args: argparse.Namespace) -> int:
    if not args.slides.is_dir():
        print(
            f"no slide folder at {args.slides} (set --slides or PROLIF_DEMO_SLIDES)",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    tiles = out / "tiles"
    env = {
        "PROLIF_SLIDE_ROOTS": str(args.slides.resolve()),
        "PROLIF_TILES_ROOT": str(tiles),
        "PROLIF_BATCH_SIZE": "16",
    }
    run_id = uuid.uuid4().hex[:12]
    started = time.time()
    print(f"starting broker, Ray and services (logs in {out / 'run'}) ...", file=sys.stderr)
    with EmbeddedStack(out / "run", env=env) as stack:
        up_s = time.time() - started
        settings = load(KafkaSettings, bootstrap_servers=stack.env["PROLIF_KAFKA_BOOTSTRAP"])
        bus = Bus(settings, "demo")
        try:
            msgs = demo_slides(args.slides)
            for m in msgs:
                m.run_id = run_id
                bus.publish(settings.topic_ingest, m.slide_id, m)
            bus.flush()
            print(f"ingested {len(msgs)} slides over Kafka, run {run_id}", file=sys.stderr)
            progress = follow(bus, settings, run_id, [m.slide_id for m in msgs], args.timeout)
        finally:
            bus.close()
    total_s = time.time() - started
    print(f"\n{'slide':<30} {'stage':<9} {'candidates':>10} {'kept':>6}  note")
    for slide_id, p in progress.items():
        note = p.reason or "; ".join(p.warnings)
        print(f"{slide_id:<30} {p.stage:<9} {p.candidates:>10} {p.kept:>6}  {note[:90]}")
    manifest = {
        "run_id": run_id,
        "slides": {
            s: {
                "stage": p.stage,
                "candidates": p.candidates,
                "kept": p.kept,
                "manifest": p.manifest,
                "reason": p.reason,
                "warnings": p.warnings,
            }
            for s, p in progress.items()
        },
        "counts": {
            "slides": len(progress),
            "filtered": sum(p.stage == "filtered" for p in progress.values()),
            "failed": sum(p.stage == "failed" for p in progress.values()),
            "tiles_kept": sum(p.kept for p in progress.values()),
        },
        "timings_s": {"startup": round(up_s, 2), "total": round(total_s, 2)},
        "tiles_root": str(tiles),
    }
    (out / "run.json").write_text(json.dumps(manifest, indent=2))
    print(f"\nshards under {tiles}; run manifest {out / 'run.json'}", file=sys.stderr)
    print(json.dumps({"run_id": run_id, **manifest["counts"], **manifest["timings_s"]}))
    unfinished = [s for s, p in progress.items() if not p.finished]
    return 1 if unfinished else 0
