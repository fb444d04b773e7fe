"""ScoringService in-process with a stand-in model client (no broker, no Ray, no model server):
the gRPC wiring of cancellation and deadlines, request validation, health and reflection; the
model client's retries; aggregation, heatmap and grading settings as units."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.runtime.validation import MAX_MESSAGE_BYTES
from prolifscore.localstack.broker import free_port
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc
from tests.slides import CMU, SLIDES, TCGA

pytest.importorskip("tensorflow")  # the model client speaks TensorFlow Serving's protos

from prolifscore.scoring.config import ScoringSettings
from prolifscore.scoring.model_client import (
    ModelError,
    ModelUnavailable,
    PredictionClient,
)
from prolifscore.scoring.server import SERVICE_NAME, build, options_from, status_for

TILE_PROBS = [0.2, 0.5, 0.3]


class SlowModels:
    """Answers like the served models, `delay` seconds per Predict, counting the calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def predict(
        self,
        model: str,
        tiles: np.ndarray,
        output: str,
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[np.ndarray, int]:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        n, h, w = tiles.shape[:3]
        if output == "probabilities":
            return np.tile(np.float32(TILE_PROBS), (n, 1)), 1
        return np.zeros((n, -(-h // 8), -(-w // 8)), np.float32), 1

    def close(self) -> None:
        pass

    def settle(self) -> int:
        """The call count once no Predict has started for a while."""
        before = -1
        while before != self.calls:
            before = self.calls
            time.sleep(3 * self.delay + 0.3)
        return self.calls


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[grpc.Channel, SlowModels]]:
    models = SlowModels(delay=0.25)
    settings = load(
        ScoringSettings,
        environ={},
        runtime=load(RuntimeSettings, environ={}, slide_roots=(SLIDES,), results_root=tmp_path),
        port=0,
        ray_readers=0,
        kafka_enabled=False,
        predict_batch=2,  # TCGA: 23 kept tiles, 12 batches, 3 s of Predict with skip_mitosis
    )
    runtime, _ = build(settings, models)
    runtime.start()
    runtime.set_serving(True)
    channel = grpc.insecure_channel(f"127.0.0.1:{runtime.port}")
    try:
        yield channel, models
    finally:
        channel.close()
        runtime.stop()


def _still_serving(channel: grpc.Channel, models: SlowModels) -> None:
    models.delay = 0.0
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    ok = stub.ScoreSlide(spb.ScoreRequest(path=str(CMU), skip_mitosis=True), timeout=60)
    assert ok.tiles_scored > 0 and ok.tumor_score == 2
    assert list(ok.probabilities) == pytest.approx(TILE_PROBS, abs=1e-6)


def test_client_cancellation_stops_the_slides_work(service):
    channel, models = service
    call = scoring_pb2_grpc.ScoringServiceStub(channel).StreamScoreSlide(
        spb.ScoreRequest(path=str(TCGA), skip_mitosis=True), timeout=60
    )
    for event in call:
        if event.progress.tiles_scored >= 2:
            break
    call.cancel()
    stopped_at = models.settle()
    assert stopped_at < 12, "the service went on predicting after the client cancelled"
    _still_serving(channel, models)


def test_deadline_stops_the_slides_work_on_the_server(service):
    channel, models = service
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreSlide(spb.ScoreRequest(path=str(TCGA), skip_mitosis=True), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped_at = models.settle()
    assert stopped_at < 12, "the service went on predicting past the request's deadline"
    _still_serving(channel, models)


def test_out_of_range_enum_is_invalid_argument(service):
    channel, models = service
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreSlide(spb.ScoreRequest(path=str(CMU), aggregation=7), timeout=30)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "aggregation 7" in err.value.details()
    assert models.calls == 0
    _still_serving(channel, models)


# (request fields, status code, text the details must contain) for hostile requests
HOSTILE = [
    ({"path": "/slides/a\x00.svs"}, grpc.StatusCode.INVALID_ARGUMENT, "path contains"),
    ({"path": "x" * 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "path is longer than 4096 bytes"),
    ({"path": str(CMU), "request_id": "../../x"}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ({"path": str(CMU), "request_id": "r" * 200_000}, grpc.StatusCode.INVALID_ARGUMENT, "128"),
    ({"path": str(CMU), "slide_id": "a\u202eb"}, grpc.StatusCode.INVALID_ARGUMENT, "slide_id"),
    ({"path": str(SLIDES / ".." / ".." / "etc" / "passwd")}, grpc.StatusCode.PERMISSION_DENIED, ""),
    ({"path": "%2e%2e%2f%2e%2e%2fetc%2fpasswd"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    # 4 KB of UTF-8 that the reader's message quotes: clipped, or its percent-encoded trailer
    # would pass gRPC's 8 KB metadata limit and the client would see an error about that instead
    ({"path": "/etc/" + "é" * 2000}, grpc.StatusCode.PERMISSION_DENIED, "outside"),
    (
        {"path": str(CMU), "spec": pb.TilingSpec(tissue_threshold=float("nan"))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "spec.tissue_threshold must be a finite number",
    ),
    (
        {"path": str(CMU), "spec": pb.TilingSpec(max_tiles=-1)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "spec.max_tiles",
    ),
]


def test_hostile_requests_get_short_answers_and_the_service_goes_on(service):
    """NUL bytes, oversize fields, traversal, bidi tricks: a status code that says what is wrong
    in a short message (never the value echoed), no work started, the service still serving."""
    channel, models = service
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    for fields, code, text in HOSTILE:
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreSlide(spb.ScoreRequest(**fields), timeout=30)
        assert err.value.code() == code, fields.keys()
        assert text in err.value.details()
        assert len(err.value.details().encode()) <= MAX_MESSAGE_BYTES
    assert models.calls == 0
    _still_serving(channel, models)


def test_a_request_past_the_message_limit_is_refused_by_the_transport(service):
    channel, models = service
    stub = scoring_pb2_grpc.ScoringServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreSlide(spb.ScoreRequest(path=str(CMU), request_id="r" * (5 << 20)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(err.value.details()) < 200
    _still_serving(channel, models)


def test_health_and_reflection_name_the_scoring_service(service):
    channel, _ = service
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {
        s.name
        for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=5
        )
        for s in r.list_services_response.service
    }
    assert {"prolifscore.v1.ScoringService", "grpc.health.v1.Health"} <= names


# -- model client: retries with backoff, bounded by the request's deadline --------------------


def _tiles() -> np.ndarray:
    return np.zeros((1, 16, 16, 3), np.uint8)


def test_retries_back_off_then_unavailable_naming_the_server(caplog):
    address = f"127.0.0.1:{free_port()}"
    client = PredictionClient(address, retries=3, backoff_s=0.05)
    logger = "prolifscore.scoring.model_client"
    with (
        caplog.at_level(logging.WARNING, logger=logger),
        pytest.raises(ModelUnavailable) as err,
    ):
        client.predict("resnet50", _tiles(), "probabilities")
    client.close()
    delays = [getattr(r, "in_s", None) for r in caplog.records if r.name == logger]
    assert delays == [0.05, 0.1, 0.2]  # exponential backoff between the 4 attempts
    assert address in str(err.value) and "after 4 attempts" in str(err.value)
    assert status_for(err.value) == grpc.StatusCode.UNAVAILABLE


def test_retries_stop_at_the_requests_deadline():
    address = f"127.0.0.1:{free_port()}"
    client = PredictionClient(address, retries=6, backoff_s=0.2)  # 12.6 s of backoff in all
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="deadline") as err:
        client.predict("resnet50", _tiles(), "probabilities", timeout=0.5)
    client.close()
    assert time.monotonic() - start < 0.5
    assert address in str(err.value)


def test_model_errors_map_to_status_codes():
    timed_out = ModelError(grpc.StatusCode.DEADLINE_EXCEEDED, "model server x: deadline")
    assert status_for(timed_out) == grpc.StatusCode.DEADLINE_EXCEEDED
    unknown = ModelError(grpc.StatusCode.NOT_FOUND, "Servable not found")
    assert status_for(unknown) == grpc.StatusCode.FAILED_PRECONDITION


# -- aggregation, grading settings, heatmap --------------------------------------------------


def test_grading_thresholds_and_aggregation_come_from_settings():
    settings = load(
        ScoringSettings,
        environ={
            "PROLIF_MITOTIC_THRESHOLDS": "2,5",
            "PROLIF_AGGREGATION": "rounded_mean",
            "PROLIF_MITOSIS_THRESHOLD": "0.8",
            "PROLIF_HPF_AREA_MM2": "0.25",
        },
    )
    options = options_from(settings)
    assert [options.grading.mitotic_score(c) for c in (2, 3, 5, 6)] == [1, 2, 2, 3]
    assert options.aggregation == spb.AGGREGATION_ROUNDED_MEAN_CLASS
    assert options.grading.threshold == 0.8
    assert options.grading.region_side_um() == pytest.approx(np.sqrt(2.5) * 1000)
    for bad in ("9,3", "4", "1,2,3"):
        with pytest.raises(ValueError, match="PROLIF_MITOTIC_THRESHOLDS"):
            options_from(load(ScoringSettings, environ={"PROLIF_MITOTIC_THRESHOLDS": bad}))
    with pytest.raises(ValueError, match="PROLIF_AGGREGATION"):
        options_from(load(ScoringSettings, environ={"PROLIF_AGGREGATION": "median"}))


def test_heatmap_colours_tiles_by_probability_and_marks_mitoses():
    from prolifscore.scoring import heatmap

    thumbnail = np.full((100, 100, 3), 255, np.uint8)  # a 1000 px slide at downsample 10
    tiles = [(pb.Tile(x=0, y=0), 1.0), (pb.Tile(x=400, y=400), 0.0)]
    png = heatmap.render(thumbnail, 10.0, tiles, 200, [(900.0, 100.0)])
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert image.shape[:2] == (800, 800)  # enlarged to at least 768 px
    r, g, b = image[80, 80]  # inside the first tile (0..160 px): high probability, red
    assert r > g + 60 and r > b + 60
    r, g, b = image[400, 400]  # inside the second tile (320..480 px): low probability, blue
    assert b > r + 60 and b > g + 60
    r, g, b = image[80, 720]  # the mitosis at level-0 (900, 100): a magenta dot
    assert r > 200 and b > 200 and g < 80
    assert (image[700, 700] == 255).all()  # no tile there: the thumbnail shows through


class PeakModels(SlowModels):
    """One mitosis-map peak of probability 0.7 per tile; versions 4 (tumor) and 7 (mitosis)."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)

    def predict(
        self,
        model: str,
        tiles: np.ndarray,
        output: str,
        timeout: float | None = None,
        label: str = "",
    ) -> tuple[np.ndarray, int]:
        maps, _ = super().predict(model, tiles, output, timeout)
        if output == "probabilities":
            return maps, 4
        maps[:, maps.shape[1] // 2, maps.shape[2] // 2] = 0.7
        return maps, 7


def _export_metadata(root, model: str, version: int, **meta) -> None:
    import json

    from prolifscore.core.models.contract import METADATA_FILE

    path = root / model / str(version) / METADATA_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(meta))


def test_served_models_metadata_sets_the_threshold_and_flags_untrained_models(tmp_path):
    """With the model root readable, the detector's exported threshold replaces the configured
    one, and a model exported untrained is flagged in the result."""
    from prolifscore.scoring.scorer import ScoringOptions, score_slide

    request = spb.ScoreRequest(path=str(CMU))
    common = {"slide_roots": (str(SLIDES),), "models": PeakModels()}
    plain = score_slide(request, options=ScoringOptions(), **common)
    assert plain.mitosis_threshold == pytest.approx(0.5)
    assert plain.mitosis_count > 0 and not any("untrained" in w for w in plain.warnings)

    _export_metadata(tmp_path, "mitosis", 7, trained=True, threshold=0.9)
    _export_metadata(tmp_path, "resnet50", 4, trained=False)
    served = score_slide(request, options=ScoringOptions(metadata_root=str(tmp_path)), **common)
    assert served.mitosis_threshold == pytest.approx(0.9)
    assert served.mitosis_count == 0  # every peak (0.7) is under the detector's own 0.9
    assert [w for w in served.warnings if "untrained" in w] == [
        "model resnet50 v4 is untrained (random initialisation): this is not a real score"
    ]
    assert served.tiles_scored == plain.tiles_scored and served.tumor_score == plain.tumor_score
