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
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prolifscore.cli.ingest import build_messages, follow
from prolifscore.core.runtime.bus import Bus, DecodeError, decode
from prolifscore.core.runtime.settings import KafkaSettings, load
from prolifscore.localstack.stack import EmbeddedStack

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="the whole system end to end on the embedded runtime")
    p.add_argument(
        "--slides",
        type=Path,
        default=Path(os.environ.get("PROLIF_DEMO_SLIDES", "../shared/data/slides")),
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
    p.set_defaults(func=run)


def _step(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def _wait_models(
    bus: Bus, settings: KafkaSettings, topic: str, wanted: set[str], timeout: float
) -> dict[str, Any]:
    from prolifscore.v1 import training_pb2 as tpb

    consumer = bus.consumer([topic], f"demo-models-{uuid.uuid4().hex[:6]}")
    got: dict[str, Any] = {}
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


def _wait_served(address: str, models: dict[str, Any], timeout: float) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
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


def run(args: argparse.Namespace) -> int:
    from prolifscore.cli.score import score_remote, summary
    from prolifscore.synthetic.mitosis_set import make_mitosis_dataset
    from prolifscore.synthetic.slides import make_synthetic_slides
    from prolifscore.v1 import scoring_pb2 as spb
    from prolifscore.v1 import training_pb2 as tpb

    if not args.slides.is_dir():
        print(
            f"no slide folder at {args.slides} (set --slides or PROLIF_DEMO_SLIDES)",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    real = args.slides.resolve()
    _step("making a labelled synthetic set from real tissue (planted mitoses)")
    synthetic = make_synthetic_slides(
        out / "synthetic", slides=args.synthetic_slides, size_px=args.synthetic_size, seed=7
    )
    mitosis_data = make_mitosis_dataset(
        out / "mitosis-data",
        cases=args.mitosis_cases,
        regions_per_case=args.mitosis_regions,
        seed=7,
    )
    env = {
        "PROLIF_SLIDE_ROOTS": f"{real},{synthetic}",
        "PROLIF_TILES_ROOT": str(out / "tiles"),
        "PROLIF_MODEL_ROOT": str(out / "models"),
        "PROLIF_RUNS_ROOT": str(out / "runs"),
        "PROLIF_RESULTS_ROOT": str(out / "results"),
        "PROLIF_MODEL_SERVER_POLL_S": "1",
        "PROLIF_LOG_LEVEL": "WARNING",
    }
    timings: dict[str, float] = {}
    _step(f"starting broker, Ray, model server and services (logs: {out / 'run'})")
    with EmbeddedStack(
        out / "run", env=env, services=("modelserver", "tiling", "filtering", "training", "scoring")
    ) as stack:
        timings["startup_s"] = round(time.time() - started, 1)
        settings = load(KafkaSettings, bootstrap_servers=stack.env["PROLIF_KAFKA_BOOTSTRAP"])
        bus = Bus(settings, "demo")
        try:
            t0 = time.time()
            paths = sorted(synthetic.glob("*.tiff")) + [
                p for p in sorted(real.iterdir()) if p.suffix.lower() in SLIDE_SUFFIXES
            ]
            ns = argparse.Namespace(
                paths=paths,
                labels=synthetic / "ground_truth.csv",
                tissue_mode=None,
                stain=None,
                max_tiles=None,
            )
            msgs = build_messages(ns, "demo")
            for m in msgs:
                if m.slide_id.startswith("kidney"):  # a macro image: a speck of tissue
                    m.spec.tile_size, m.spec.target_mpp, m.spec.tissue_threshold = 32, 0.25, 0.5
                bus.publish(settings.topic_ingest, m.slide_id, m)
            bus.flush()
            _step(f"ingested {len(msgs)} slides over Kafka; preprocessing (tiling -> filtering)")
            progress = follow(bus, settings, "demo", [m.slide_id for m in msgs], args.timeout)
            timings["preprocess_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            _step("training both models (quick profile) through the training service")
            for model, dataset in (("mitosis", mitosis_data), ("resnet50", out / "tiles")):
                req = tpb.TrainRequest(
                    request_id=f"demo-{model}",
                    model=model,
                    dataset=str(dataset),
                    profile="quick",
                    epochs=args.epochs,
                    input_size=args.input_size if model == "resnet50" else 0,
                )
                bus.publish("prolif.train.requests", req.request_id, req)
            bus.flush()
            published = _wait_models(
                bus, settings, "prolif.models", {"mitosis", "resnet50"}, args.timeout
            )
            _wait_served(stack.env["PROLIF_MODEL_SERVER"], published, 120)
            timings["train_s"] = round(time.time() - t0, 1)
        finally:
            bus.close()
        t0 = time.time()
        target = next((m for m in msgs if m.slide_id == args.score), msgs[-1])
        _step(f"scoring {target.slide_id} over gRPC ({stack.processes['scoring'].grpc_address})")
        score_args = argparse.Namespace(
            server=stack.processes["scoring"].grpc_address,
            timeout=args.timeout,
            token="",
            tls_ca=None,
        )
        request = spb.ScoreRequest(
            slide_id=target.slide_id, path=target.path, include_heatmap=True, include_tiles=True
        )
        result = score_remote(score_args, request)
        timings["score_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - started, 1)
    (out / "heatmap.png").write_bytes(result.heatmap_png)
    from google.protobuf import json_format

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
    return 0
