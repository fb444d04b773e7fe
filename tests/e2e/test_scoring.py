"""Scoring over gRPC against the local model server (untrained test models: the numbers are
meaningless, the machinery is what is checked), Kafka batch scoring, and the score CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prolifscore.core.runtime import tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.settings import (
    PreprocessSettings,
    RuntimeSettings,
    TracingSettings,
    load,
    to_env,
)
from prolifscore.core.runtime.tls import open_channel
from prolifscore.core.wsi.preprocess import iter_kept_tiles, plan_slide
from prolifscore.core.wsi.slide import open_slide
from prolifscore.localstack.broker import free_port
from prolifscore.localstack.stack import ServiceProcess
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc
from tests.harness import Watcher, isolated_kafka
from tests.slides import BROKEN, CMU, SLIDES, TCGA

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_root(exported_root: Path) -> Path:
    """The session's untrained models (read only)."""
    return exported_root


@pytest.fixture(scope="module")
def stack(broker, ray_head, model_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    k = isolated_kafka(broker.bootstrap, "score")
    run = uuid.uuid4().hex[:8]
    topics = {"requests": f"score.{run}.requests", "results": f"score.{run}.results"}
    # Both trace into one file (test_score_request_is_one_trace_down_to_the_model_server).
    traced = {"PROLIF_TRACING": "file", "PROLIF_TRACING_FILE": str(tmp / "spans.jsonl")}
    models = ServiceProcess(
        "prolifscore.modelserver.server",
        {"PROLIF_MODEL_ROOT": str(model_root), **traced},
        tmp / "modelserver.log",
        port_env="PROLIF_MODEL_SERVER_PORT",
    ).start(timeout=120)
    env = {
        **to_env(k),
        "PROLIF_RAY_ADDRESS": ray_head.address,
        "PROLIF_SLIDE_ROOTS": str(SLIDES),
        "PROLIF_RESULTS_ROOT": str(tmp / "results"),
        "PROLIF_MODEL_SERVER": models.grpc_address,
        "PROLIF_TOPIC_SCORE_REQUESTS": topics["requests"],
        "PROLIF_TOPIC_SCORE_RESULTS": topics["results"],
        "PROLIF_PREDICT_BATCH": "8",
        **traced,
    }
    scoring = ServiceProcess(
        "prolifscore.scoring.server", env, tmp / "scoring.log", port_env="PROLIF_SCORING_PORT"
    ).start(timeout=120)
    channel = grpc.insecure_channel(scoring.grpc_address)
    bus = Bus(k, "test")
    yield {
        "stub": scoring_pb2_grpc.ScoringServiceStub(channel),
        "k": k,
        "topics": topics,
        "bus": bus,
        "tmp": tmp,
        "address": scoring.grpc_address,
        "models": models,
    }
    channel.close()
    bus.close()
    codes = {p.module: (p.stop(), p.tail()) for p in (scoring, models)}
    for module, (code, tail) in codes.items():
        assert code == 0, f"{module} did not stop cleanly:\n{tail}"


def library_count(path: Path) -> int:
    with open_slide(path) as slide:
        plan = plan_slide(slide, path.stem, pb.TilingSpec(), load(PreprocessSettings, environ={}))
        return sum(1 for _ in iter_kept_tiles(slide, plan))


@pytest.mark.parametrize("path", [CMU, TCGA])
def test_stream_score_slide_over_grpc(stack, path):
    req = spb.ScoreRequest(path=str(path), include_heatmap=True, include_tiles=True)
    events = list(stack["stub"].StreamScoreSlide(req, timeout=120))
    progress = [e.progress for e in events if e.HasField("progress")]
    result = events[-1].result
    assert events[-1].HasField("result") and progress
    assert [p.tiles_scored for p in progress] == sorted(p.tiles_scored for p in progress)
    assert result.slide_id == path.stem and result.tumor_score in (1, 2, 3)
    assert abs(sum(result.probabilities) - 1.0) < 1e-5 and len(result.probabilities) == 3
    assert result.tiles_total == result.tiles_scored == library_count(path) > 0
    assert len(result.tiles) == result.tiles_total
    assert all(abs(sum(t.probabilities) - 1) < 1e-4 for t in result.tiles)
    assert result.heatmap_png.startswith(PNG)
    assert {m.name for m in result.models} == {"resnet50", "mitosis"}
    assert result.mitotic_score in (1, 2, 3) and result.mitosis_count == len(result.mitoses)
    assert progress[-1].tiles_scored == result.tiles_scored


def test_unary_and_seed_aggregation(stack):
    mean = stack["stub"].ScoreSlide(spb.ScoreRequest(path=str(CMU), skip_mitosis=True), timeout=120)
    seed = stack["stub"].ScoreSlide(
        spb.ScoreRequest(
            path=str(CMU), aggregation=spb.AGGREGATION_ROUNDED_MEAN_CLASS, skip_mitosis=True
        ),
        timeout=120,
    )
    assert mean.aggregation == spb.AGGREGATION_MEAN_PROBABILITY
    assert seed.aggregation == spb.AGGREGATION_ROUNDED_MEAN_CLASS
    assert list(mean.probabilities) == pytest.approx(list(seed.probabilities))
    assert mean.mitotic_score == 0 and [m.name for m in mean.models] == ["resnet50"]


@pytest.mark.parametrize(
    "request_fields,code,text",
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "path is required"),
        ({"path": str(SLIDES / "missing.svs")}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"path": "/etc/hostname"}, grpc.StatusCode.PERMISSION_DENIED, "outside"),
        ({"path": str(BROKEN)}, grpc.StatusCode.FAILED_PRECONDITION, "broken.svs"),
        (
            {"path": str(CMU), "spec": pb.TilingSpec(tissue_threshold=2)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "tissue_threshold",
        ),
    ],
)
def test_bad_requests_get_their_status_and_service_goes_on(stack, request_fields, code, text):
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].ScoreSlide(spb.ScoreRequest(**request_fields), timeout=60)
    assert err.value.code() == code and text in err.value.details()
    ok = stack["stub"].ScoreSlide(spb.ScoreRequest(path=str(CMU), skip_mitosis=True), timeout=120)
    assert ok.tiles_scored > 0


def test_deadline_is_honoured(stack):
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].ScoreSlide(spb.ScoreRequest(path=str(TCGA)), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_kafka_batch_scoring_with_a_bad_slide_and_garbage(stack):
    bus, topics = stack["bus"], stack["topics"]
    bus.ensure_topics(list(topics.values()))
    requests = {
        "r-cmu": spb.ScoreRequest(request_id="r-cmu", path=str(CMU), skip_mitosis=True),
        "r-broken": spb.ScoreRequest(request_id="r-broken", path=str(BROKEN)),
        "r-tcga": spb.ScoreRequest(request_id="r-tcga", path=str(TCGA)),
    }
    bus.publish(topics["requests"], "r-cmu", requests["r-cmu"])
    bus.publish_bytes(topics["requests"], "junk", b"\x08\xff\xff not protobuf")
    bus.publish(topics["requests"], "r-broken", requests["r-broken"])
    bus.publish(topics["requests"], "r-tcga", requests["r-tcga"], content_type="application/json")
    bus.flush()
    results = Watcher(bus, topics["results"], spb.ScoreResult, f"res-{uuid.uuid4().hex[:6]}")
    got = results.wait_for(lambda items: {i.request_id for i in items if i} >= set(requests), 240)
    by_id = {r.request_id: r for r in got if r}
    assert by_id["r-cmu"].score.tiles_scored > 0 and by_id["r-tcga"].score.mitotic_score in (
        1,
        2,
        3,
    )
    assert by_id["r-broken"].error.code == "FAILED_PRECONDITION"
    assert Path(by_id["r-tcga"].score.heatmap_path).read_bytes().startswith(PNG)
    # redelivery of the same request id republishes the stored result, not a new scoring
    bus.publish(topics["requests"], "r-cmu", requests["r-cmu"])
    bus.flush()
    again = results.wait_for(
        lambda items: sum(1 for i in items if i and i.request_id == "r-cmu") >= 2, 120
    )
    first, second = [r for r in again if r and r.request_id == "r-cmu"][:2]
    assert first == second
    results.close()
    dlq = Watcher(bus, stack["k"].topic_dlq, pb.DeadLetter, f"dlq-{uuid.uuid4().hex[:6]}")
    letters = dlq.wait_for(lambda items: len(items) >= 2, 60)
    dlq.close()
    assert {d.key for d in letters} >= {b"junk", b"r-broken"}
    # the bad slide's failure is also a status record, with the reader's reason
    status = Watcher(bus, stack["k"].topic_status, pb.SlideStatus, f"st-{uuid.uuid4().hex[:6]}")
    events = status.wait_for(lambda items: any(i and i.run_id == "r-broken" for i in items), 60)
    status.close()
    failed = next(s for s in events if s and s.run_id == "r-broken")
    assert failed.stage == pb.STAGE_FAILED and failed.service == "scoring"
    assert failed.path == str(BROKEN) and "broken.svs" in failed.reason


def test_kafka_requests_whose_ids_are_not_file_names(stack):
    """Request ids name result files: one that climbs out of the results root, or 5 MB of it,
    is answered INVALID_ARGUMENT without repeating it, dead-lettered, and writes nothing."""
    bus, topics, tmp = stack["bus"], stack["topics"], stack["tmp"]
    bus.ensure_topics(list(topics.values()))
    hostile = {
        "trav": spb.ScoreRequest(request_id="../../escaped-result", path=str(CMU)),
        "big": spb.ScoreRequest(request_id="q" * (5 << 20), path=str(CMU)),
        "nul": spb.ScoreRequest(request_id="r-nul", path=str(CMU) + "\x00"),
    }
    for key, request in hostile.items():
        bus.publish(topics["requests"], key, request)
    bus.publish(
        topics["requests"], "r-after", spb.ScoreRequest(request_id="r-after", path=str(CMU))
    )
    bus.flush()
    results = Watcher(bus, topics["results"], spb.ScoreResult, f"res-{uuid.uuid4().hex[:6]}")
    got = results.wait_for(lambda items: any(i and i.request_id == "r-after" for i in items), 240)
    sizes = [len(r.value) for r in results.records]
    results.close()
    errors = [r for r in got if r and r.error.code == "INVALID_ARGUMENT"]
    assert sorted(r.request_id for r in errors) == ["", "", "r-nul"]
    messages = " | ".join(r.error.message for r in errors)
    assert "request_id must match" in messages and "request_id is longer than 128" in messages
    assert "U+0000" in messages and max(sizes) < 64 * 1024  # the heatmap path, not the id
    assert next(r for r in got if r and r.request_id == "r-after").score.tiles_scored > 0
    dlq = Watcher(bus, stack["k"].topic_dlq, pb.DeadLetter, f"dlq-{uuid.uuid4().hex[:6]}")
    dlq.wait_for(lambda items: {b"trav", b"big", b"nul"} <= {d.key for d in items if d}, 60)
    dlq.close()
    assert not list(tmp.parent.rglob("escaped-result*"))
    assert {p.name for p in (tmp / "results").glob("r-*.json")} >= {"r-nul.json", "r-after.json"}


def test_score_request_is_one_trace_down_to_the_model_server(stack):
    """ScoreSlide over gRPC and a Kafka request: each the trace of the span that sent it (in
    this process, an in-memory exporter), continued by the scoring service, its Predict calls
    and the model server (their spans in the stack's file), and by the published result."""
    exporter = InMemorySpanExporter()
    tracing.setup("test", TracingSettings(), exporter=exporter)
    bus, topics = stack["bus"], stack["topics"]
    request = spb.ScoreRequest(path=str(CMU), skip_mitosis=True, spec=pb.TilingSpec(max_tiles=8))
    try:
        with open_channel(stack["address"], None) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            with tracing.span("grpc caller"):
                assert stub.ScoreSlide(request, timeout=120).tiles_scored > 0
            with tracing.span("stream caller"):  # scored in a thread of the call's context
                assert list(stub.StreamScoreSlide(request, timeout=120))[-1].HasField("result")
        with tracing.span("kafka caller", kind="producer"):
            request.request_id = f"r-traced-{uuid.uuid4().hex[:6]}"
            bus.publish(topics["requests"], request.request_id, request)
        bus.flush()
    finally:
        tracing.shutdown()
    callers = {s.name: s for s in exporter.get_finished_spans()}
    results = Watcher(bus, topics["results"], spb.ScoreResult, f"res-{uuid.uuid4().hex[:6]}")
    results.wait_for(lambda items: any(i and i.request_id == request.request_id for i in items))
    (record,) = [
        r
        for r, i in zip(results.records, results.items, strict=True)
        if i and i.request_id == request.request_id
    ]
    results.close()
    spans = [json.loads(line) for line in (stack["tmp"] / "spans.jsonl").read_text().splitlines()]
    score_slide = "prolifscore.v1.ScoringService/ScoreSlide"
    # (span of the caller, its span that sent the request, the service's first span)
    for caller, sender, entry in [
        ("grpc caller", score_slide, score_slide),  # the channel's CLIENT span sends
        ("kafka caller", "kafka caller", "score request"),
    ]:
        root = callers[caller].get_span_context()
        sent = callers[sender]
        assert sent.context.trace_id == root.trace_id
        trace = [s for s in spans if s["trace_id"] == format(root.trace_id, "032x")]
        (first,) = [s for s in trace if s["name"] == entry and s["kind"] != "client"]
        (scored,) = [s for s in trace if s["name"] == "score slide"]
        predict = "tensorflow.serving.PredictionService/Predict"
        calls = [s for s in trace if s["name"] == predict and s["kind"] == "client"]
        served = [s for s in trace if s["name"] == predict and s["kind"] == "server"]
        assert first["service"] == scored["service"] == "prolifscore-scoring"
        assert first["parent_id"] == format(sent.context.span_id, "016x")
        assert first["remote_parent"]
        assert scored["parent_id"] == first["span_id"]
        assert calls and {c["parent_id"] for c in calls} == {scored["span_id"]}
        assert {s["service"] for s in served} == {"prolifscore-modelserver"}
        assert sorted(s["parent_id"] for s in served) == sorted(c["span_id"] for c in calls)
    stream = [
        s
        for s in spans
        if s["trace_id"] == format(callers["stream caller"].context.trace_id, "032x")
    ]
    (served_stream,) = [s for s in stream if s["name"].endswith("/StreamScoreSlide")]
    (scored_stream,) = [s for s in stream if s["name"] == "score slide"]
    assert served_stream["parent_id"] == format(callers["stream caller"].context.span_id, "016x")
    assert scored_stream["parent_id"] == served_stream["span_id"]
    # the result record carries the request's trace on to whoever reads it
    parent = dict(record.headers)["traceparent"].decode()
    assert parent.split("-")[1] == format(callers["kafka caller"].context.trace_id, "032x")


def test_score_cli_remote_and_local(stack, model_root, tmp_path):
    heat = tmp_path / "heat.png"
    env = {**os.environ}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prolifscore.cli.main",
            "score",
            str(CMU),
            "--server",
            stack["address"],
            "--json",
            "--heatmap",
            str(heat),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    assert remote["tumorScore"] in (1, 2, 3) and heat.read_bytes().startswith(PNG)
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "prolifscore.cli.main",
            "score",
            str(CMU),
            "--local",
            "--model-root",
            str(model_root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert local.returncode == 0, local.stderr
    summary = json.loads(local.stdout.strip().splitlines()[-1])
    # same models, same tiles: the in-process route gives the gRPC route's answer
    assert summary["probabilities"] == pytest.approx(
        [round(p, 4) for p in remote["probabilities"]], abs=2e-4
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "prolifscore.cli.main",
            "score",
            str(BROKEN),
            "--server",
            stack["address"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 1 and "FAILED_PRECONDITION" in bad.stderr


# -- in-process servicer: unreachable model server, bearer token, TLS -----------------------


def _inprocess(tmp_path, **overrides):
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.scoring.server import build

    runtime = load(
        RuntimeSettings,
        environ={},
        slide_roots=(SLIDES,),
        **overrides.pop("runtime", {}),
    )
    settings = load(
        ScoringSettings,
        environ={},
        runtime=runtime,
        port=0,
        ray_readers=0,
        kafka_enabled=False,
        **overrides,
    )
    rt, servicer = build(settings)
    rt.start()
    rt.set_serving(True)
    return rt, servicer


def test_unreachable_model_server_is_unavailable_naming_it(tmp_path):
    port = free_port()
    rt, _ = _inprocess(tmp_path, model_server=f"127.0.0.1:{port}", model_retries=1)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{rt.port}")
        with channel, pytest.raises(grpc.RpcError) as err:
            scoring_pb2_grpc.ScoringServiceStub(channel).ScoreSlide(
                spb.ScoreRequest(path=str(CMU)), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"127.0.0.1:{port}" in err.value.details()
    finally:
        rt.stop()


def test_bearer_token_and_tls(stack, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    rt, _ = _inprocess(
        tmp_path,
        auth_token="s3cret",
        model_server=stack["models"].grpc_address,
        runtime={"tls_cert_file": str(cert), "tls_key_file": str(key)},
    )
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{rt.port}", creds) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            req = spb.ScoreRequest(path=str(CMU), skip_mitosis=True)
            with pytest.raises(grpc.RpcError) as err:
                stub.ScoreSlide(req, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ScoreSlide(req, timeout=120, metadata=[("authorization", "Bearer s3cret")])
            assert ok.tiles_scored > 0
        plain = grpc.insecure_channel(f"127.0.0.1:{rt.port}")
        with plain, pytest.raises(grpc.RpcError):  # TLS is required
            scoring_pb2_grpc.ScoringServiceStub(plain).ScoreSlide(req, timeout=10)
    finally:
        rt.stop()


def test_cancellation_stops_the_work(model_root):
    from prolifscore.scoring.model_client import InProcessModels
    from prolifscore.scoring.scorer import Cancelled, ScoringOptions, score_slide

    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 1

    models = InProcessModels(model_root)
    with pytest.raises(Cancelled):
        score_slide(
            spb.ScoreRequest(path=str(TCGA)),
            slide_roots=(str(SLIDES),),
            options=ScoringOptions(predict_batch=4),
            models=models,
            cancelled=cancelled,
        )
    assert calls["n"] == 2  # stopped at the second batch, not after all of them


def test_ray_readers_give_the_thread_readers_result(model_root, ray_head):
    """Large slides read their tiles in parallel Ray tasks; the result must not change."""
    from prolifscore.core.runtime.ray import init_ray
    from prolifscore.scoring.model_client import InProcessModels
    from prolifscore.scoring.scorer import ScoringOptions, score_slide

    init_ray(ray_head.address)
    models = InProcessModels(model_root)
    request = spb.ScoreRequest(path=str(CMU), include_tiles=True)
    results = [
        score_slide(
            request,
            slide_roots=(str(SLIDES),),
            models=models,
            options=ScoringOptions(predict_batch=2, ray_readers=readers),
        )
        for readers in (0, 2)  # 25 candidates >= 4 batches x 2 tiles x 2 readers: Ray is used
    ]
    thread, ray_read = results
    assert thread.tiles_scored == ray_read.tiles_scored > 0
    key = lambda t: (t.col, t.row)  # noqa: E731
    assert [key(t) for t in sorted(thread.tiles, key=key)] == [
        key(t) for t in sorted(ray_read.tiles, key=key)
    ]
    assert list(thread.probabilities) == pytest.approx(list(ray_read.probabilities), abs=1e-5)
