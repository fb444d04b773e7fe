"""What durable broker storage costs the pipeline: the same slides through tiling and filtering
on the embedded stack with the broker in memory and on durable storage.

    python -m bench.broker_storage [--copies N] [--rounds R] [--batch-size B]

Each round ingests N copies of the two real sample slides (distinct slide ids) and times the
wall clock from the first publish to the last FILTERED event; the modes take turns per round so
load from elsewhere on the machine falls on all of them. Prints one JSON object. Not part of
`make bench` (whose figures the README's table shows): a decision aid, quoted in the README's
Reliability section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench import CMU, TCGA
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.events import SlideEvents
from prolifscore.core.runtime.settings import KafkaSettings
from prolifscore.localstack.broker import free_port
from prolifscore.localstack.rayhead import RayHead
from prolifscore.localstack.stack import EmbeddedStack
from prolifscore.v1 import pipeline_pb2 as pb

MODES = ("memory", "durable")
TOPICS = ("INGEST", "TASKS", "SHARDS", "STATUS", "DLQ")


def one_round(stack: EmbeddedStack, tag: str, copies: int, timeout: float = 900.0) -> float:
    """Seconds from the first publish to every slide FILTERED."""
    k = stack.settings(KafkaSettings)
    with Bus(k, "bench") as bus:
        bus.ensure_topics([k.topic_ingest, k.topic_status])
        consumer = bus.consumer([k.topic_status], f"bench-{tag}")
        while not consumer.assignment():  # joined before the clock starts (a join takes s)
            consumer.poll(timeout_ms=200)  # earlier rounds' events: not this round's
        ids = []
        start = time.perf_counter()
        for i in range(copies):
            for path in (CMU, TCGA):
                slide_id = f"{tag}-{path.stem[:4]}-{i}"
                ids.append(slide_id)
                bus.publish(
                    k.topic_ingest, slide_id, pb.SlideIngest(slide_id=slide_id, path=str(path))
                )
        bus.flush()
        view = SlideEvents()
        deadline = time.monotonic() + timeout
        while not all(view.final(s) for s in ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tag}: not all slides done in {timeout:.0f} s")
            for record in consumer.poll(timeout_ms=200):
                view.add(pb.SlideStatus.FromString(record.value))
        elapsed = time.perf_counter() - start
        consumer.close()
    failed = {s: view.final(s).reason for s in ids if view.final(s).stage != pb.STAGE_FILTERED}  # type: ignore[union-attr]
    if failed:
        raise RuntimeError(f"{tag}: failed slides {failed}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_storage", description=__doc__)
    parser.add_argument("--copies", type=int, default=3, help="copies of each sample slide")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per tile task")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    head = RayHead(free_port(), 2, work / "ray.log").start()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for r in range(args.rounds):
            for mode in MODES:  # one stack at a time, fresh each
                base = work / f"{mode}-{r}"
                env = {  # names of its own: no stray client on a reused port shares the work
                    **{f"PROLIF_TOPIC_{t}": f"bench.{mode}{r}.{t}" for t in TOPICS},
                    "PROLIF_TILING_GROUP": f"bench-{mode}{r}-tiling",
                    "PROLIF_FILTERING_GROUP": f"bench-{mode}{r}-filtering",
                    "PROLIF_SLIDE_ROOTS": str(CMU.parent),
                    "PROLIF_TILES_ROOT": str(base / "tiles"),
                    "PROLIF_BATCH_SIZE": str(args.batch_size),
                    "PROLIF_LOG_LEVEL": "WARNING",
                }
                storage = base / "broker" if mode == "durable" else None
                with EmbeddedStack(
                    base / "run",
                    env=env,
                    broker_storage=storage,
                    ray_address=head.address,
                ) as stack:
                    one_round(stack, "warm", 1)  # slides opened, Ray workers up: not counted
                    times[mode].append(round(one_round(stack, "run", args.copies), 2))
    finally:
        head.stop()
    slides = 2 * args.copies
    out = {
        "slides_per_round": slides,
        "batch_size": args.batch_size,
        "seconds": times,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "slides_per_s": {m: round(slides / statistics.median(t), 2) for m, t in times.items()},
    }
    base = out["median_s"]["memory"]
    out["cost_vs_memory"] = {m: round(t / base - 1, 3) for m, t in out["median_s"].items()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
