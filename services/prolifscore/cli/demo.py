"""`prolifscore demo`: from nothing to a scored slide on the embedded runtime.

Starts the broker, Ray, the model server and the four services on 127.0.0.1; makes a small
labelled synthetic set (real tissue with planted mitoses); ingests it over Kafka with the real
sample slides; preprocesses through tiling and filtering; trains both models briefly ("quick"
profile) through the training service; lets the model server pick the new versions up; scores a
real slide over gRPC with live progress; writes the heatmap and a JSON result; stops everything.
The models are a machinery check on synthetic data: their scores mean nothing clinically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prolifscore.cli.ingest import SlideProgress, build_messages, follow, publish_slides
from prolifscore.cli.score import score_remote, summary
from prolifscore.cli.slidefiles import SLIDE_SUFFIXES
from prolifscore.cli.train import train_request
from prolifscore.cli.up import add_storage_option, local_stack
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.codec import DecodeError, decode
from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings
from prolifscore.core.runtime.tls import open_channel
from prolifscore.synthetic.sources import default_source_dir
from prolifscore.training.config import TrainingSettings
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import training_pb2 as tpb

SERVICES = ("modelserver", "tiling", "filtering", "training", "scoring")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="the whole system end to end on the embedded runtime")
    p.add_argument(
        "--slides",
        type=Path,
        default=Path(os.environ.get("PROLIF_DEMO_SLIDES") or default_source_dir()),
        help="folder of real slides to ingest (default: ../shared/data/slides)",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    p.add_argument("--synthetic-slides", type=int, default=12, help="labelled synthetic slides")
    p.add_argument("--synthetic-size", type=int, default=2048, help="synthetic slide side (px)")
    p.add_argument("--mitosis-cases", type=int, default=6, help="synthetic mitosis cases")
    p.add_argument("--mitosis-regions", type=int, default=6, help="regions per mitosis case")
    p.add_argument(
        "--input-size", type=int, default=0, help="tumor model input (0: the quick profile's)"
    )
    p.add_argument("--epochs", type=int, default=0, help="training epochs (0: the quick profile's)")
    p.add_argument("--score", default="cmu-1-small-region", help="real slide (id) to score")
    p.add_argument("--timeout", type=float, default=900.0)
    add_storage_option(p)
    p.set_defaults(func=run)


def _step(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def _wait_models(
    bus: Bus, topic: str, wanted: set[str], timeout: float
) -> dict[str, tpb.ModelPublished]:
    consumer = bus.consumer([topic], f"demo-models-{uuid.uuid4().hex[:6]}")
    got: dict[str, tpb.ModelPublished] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not wanted <= set(got):
            for record in consumer.poll(timeout_ms=500):
                try:
                    msg = decode(record.value, record.headers, tpb.ModelPublished)
                except DecodeError:
                    continue
                if msg.request_id.startswith("demo-") and msg.model in wanted:
                    if msg.error:
                        raise RuntimeError(f"training {msg.model} failed: {msg.error}")
                    got[msg.model] = msg
                    _step(f"trained {msg.model} v{msg.version} ({len(msg.metrics)} metrics)")
    finally:
        consumer.close()
    if not wanted <= set(got):
        raise TimeoutError(f"no trained model for {sorted(wanted - set(got))} in {timeout:.0f}s")
    return got


def _wait_served(
    address: str, models: dict[str, tpb.ModelPublished], timeout: float, tls: RuntimeSettings
) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    deadline = time.monotonic() + timeout
    with open_channel(address, tls) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        for name, msg in models.items():
            while True:
                req = get_model_status_pb2.GetModelStatusRequest()
                req.model_spec.name = name
                req.model_spec.version.value = msg.version
                try:
                    status = stub.GetModelStatus(req, timeout=5)
                    if any(v.state == v.AVAILABLE for v in status.model_version_status):
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model server never served {name} v{msg.version}")
                time.sleep(0.5)


@dataclass(frozen=True)
class DemoData:
    """The slides the demo ingests and the datasets it trains on."""

    real: Path  # folder of real slides
    synthetic: Path  # labelled synthetic slides (ground_truth.csv)
    mitosis: Path  # mitosis detection dataset
    out: Path


def make_data(args: argparse.Namespace, out: Path) -> DemoData:
    """Synthetic slides with ground truth and a mitosis dataset, so training has labels."""
    _step("making a labelled synthetic set from real tissue (planted mitoses)")
    from prolifscore.synthetic.mitosis_set import make_mitosis_dataset
    from prolifscore.synthetic.slides import make_synthetic_slides

    synthetic = make_synthetic_slides(
        out / "synthetic", slides=args.synthetic_slides, size_px=args.synthetic_size, seed=7
    )
    mitosis = make_mitosis_dataset(
        out / "mitosis-data",
        cases=args.mitosis_cases,
        regions_per_case=args.mitosis_regions,
        seed=7,
    )
    return DemoData(real=args.slides.resolve(), synthetic=synthetic, mitosis=mitosis, out=out)


def stack_env(data: DemoData) -> dict[str, str]:
    """Every output under the demo's folder; slides read from the real and synthetic ones."""
    return {
        "PROLIF_SLIDE_ROOTS": f"{data.real},{data.synthetic}",
        "PROLIF_TILES_ROOT": str(data.out / "tiles"),
        "PROLIF_MODEL_ROOT": str(data.out / "models"),
        "PROLIF_RUNS_ROOT": str(data.out / "runs"),
        "PROLIF_RESULTS_ROOT": str(data.out / "results"),
        "PROLIF_DATA_ROOTS": str(data.mitosis),  # what training may read besides the tiles
        "PROLIF_MODEL_SERVER_POLL_S": "1",
        "PROLIF_LOG_LEVEL": "WARNING",
    }


def preprocess(
    bus: Bus, data: DemoData, timeout: float
) -> tuple[list[pb.SlideIngest], dict[str, SlideProgress]]:
    """Ingest the synthetic and real slides over Kafka and follow them to FILTERED."""
    paths = sorted(data.synthetic.glob("*.tiff")) + [
        p for p in sorted(data.real.iterdir()) if p.suffix.lower() in SLIDE_SUFFIXES
    ]
    msgs = build_messages(paths, "demo", labels=data.synthetic / "ground_truth.csv")
    for m in msgs:
        if m.slide_id.startswith("kidney"):  # a macro image: a speck of tissue
            m.spec.tile_size, m.spec.target_mpp, m.spec.tissue_threshold = 32, 0.25, 0.5
    publish_slides(bus, msgs)
    _step(f"ingested {len(msgs)} slides over Kafka; preprocessing (tiling -> filtering)")
    return msgs, follow(bus, bus.settings, "demo", [m.slide_id for m in msgs], timeout)


def train(
    bus: Bus, training: TrainingSettings, data: DemoData, args: argparse.Namespace
) -> dict[str, tpb.ModelPublished]:
    """Both models, quick profile, through the training service; their announcements."""
    _step("training both models (quick profile) through the training service")
    for model, dataset in (("mitosis", data.mitosis), ("resnet50", data.out / "tiles")):
        req = train_request(
            model,
            dataset,
            run_id=f"demo-{model}",
            profile="quick",
            epochs=args.epochs,
            input_size=args.input_size if model == "resnet50" else 0,
        )
        bus.publish(training.topic_requests, req.request_id, req)
    bus.flush()
    return _wait_models(bus, training.topic_models, {"mitosis", "resnet50"}, args.timeout)


def score(
    address: str, msgs: list[pb.SlideIngest], args: argparse.Namespace, tls: RuntimeSettings
) -> spb.SlideScore:
    """The chosen slide (else the last ingested) over gRPC, with live progress; over (mutual)
    TLS when the stack's environment sets PROLIF_TLS_CA_FILE."""
    target = next((m for m in msgs if m.slide_id == args.score), msgs[-1])
    _step(f"scoring {target.slide_id} over gRPC ({address})")
    request = spb.ScoreRequest(
        slide_id=target.slide_id, path=target.path, include_heatmap=True, include_tiles=True
    )
    return score_remote(address, request, timeout=args.timeout, tls=tls)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 1)


def run(args: argparse.Namespace) -> int:
    if not args.slides.is_dir():
        print(
            f"no slide folder at {args.slides} (set --slides or PROLIF_DEMO_SLIDES)",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = make_data(args, out)
    timings: dict[str, float] = {}
    _step(f"starting broker, Ray, model server and services (logs: {out / 'run'})")
    with local_stack(out / "run", stack_env(data), SERVICES, args.broker_storage) as stack:
        timings["startup_s"] = round(time.time() - started, 1)
        tls = stack.settings(RuntimeSettings)
        with Bus(stack.settings(KafkaSettings), "demo") as bus:
            with _timed(timings, "preprocess_s"):
                msgs, progress = preprocess(bus, data, args.timeout)
            with _timed(timings, "train_s"):
                published = train(bus, stack.settings(TrainingSettings), data, args)
                _wait_served(stack.processes["modelserver"].grpc_address, published, 120, tls)
        with _timed(timings, "score_s"):
            result = score(stack.processes["scoring"].grpc_address, msgs, args, tls)
    timings["total_s"] = round(time.time() - started, 1)
    report(out, progress, published, result, timings)
    print_view_command(data, result)
    return 0


def print_view_command(data: DemoData, result: spb.SlideScore) -> None:
    """The demo's last words: the one command that opens the scored slide in the viewer (it
    reads the slide and the stored result from disk, so it works after the stack stopped)."""
    slide = next(p for p in sorted(data.real.iterdir()) if p.stem == result.slide_id)
    cli = Path(sys.executable).with_name("prolifscore")
    print("\nSee what the model saw: the slide with its tiles, heatmap and mitoses in the viewer:")
    print(f"{_relative(cli)} view {_relative(slide)} --results {_relative(data.out / 'results')}")


def _relative(path: Path) -> str:
    """A path as short as it can be written from here (absolute where it is not below)."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def report(
    out: Path,
    progress: dict[str, SlideProgress],
    published: dict[str, tpb.ModelPublished],
    result: spb.SlideScore,
    timings: dict[str, float],
) -> None:
    """Heatmap, result and run summary files; a table of slides and the score on stdout, the
    last line one JSON object."""
    from google.protobuf import json_format

    (out / "heatmap.png").write_bytes(result.heatmap_png)
    full = json_format.MessageToDict(result)
    full.pop("heatmapPng", None)
    (out / "result.json").write_text(json.dumps(full, indent=2))
    print(f"\n{'slide':<28} {'stage':<9} {'kept':>6}  note")
    for slide_id, p in progress.items():
        print(
            f"{slide_id:<28} {p.stage:<9} {p.kept:>6}  {(p.reason or '; '.join(p.warnings))[:70]}"
        )
    print(
        "\nmodels: "
        + ", ".join(f"{n} v{m.version}" for n, m in sorted(published.items()))
        + "  (trained on synthetic data: a machinery check)"
    )
    print(
        f"scored {result.slide_id}: tumor score {result.tumor_score}, probabilities "
        + ", ".join(f"{p:.3f}" for p in result.probabilities)
        + f"; mitotic score {result.mitotic_score} ({result.mitosis_count} mitoses); "
        f"{result.tiles_scored} tiles"
    )
    print(f"heatmap {out / 'heatmap.png'}; result {out / 'result.json'}; timings {timings}")
    (out / "run.json").write_text(
        json.dumps(
            {"timings": timings, "slides": {s: p.stage for s, p in progress.items()}}, indent=2
        )
    )
    print(json.dumps({**summary(result), "timings": timings}))
