"""Hostile Kafka messages at the services' handlers (the code a consumed record reaches), without
a broker: a request id that climbs out of the results or runs root, a 5 MB run id, a NUL in a
path, a data set or weights file outside the configured roots. Each is answered with a failed
status / error result and a dead letter that do not repeat the offending value, and nothing is
written outside the roots. tests/e2e (test_pipeline_e2e, test_scoring, test_training_inputs)
send the same through a real broker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prolifscore.core.runtime.settings import KafkaSettings, RuntimeSettings, load
from prolifscore.core.runtime.validation import InvalidInput, OutsideRoots
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import training_pb2 as tpb
from tests.slides import CMU, SLIDES

FIVE_MB = "r" * (5 * 1024 * 1024)


class FakeBus:
    """What the handlers publish, by topic, and the reasons of their dead letters."""

    service = "test"

    def __init__(self) -> None:
        self.settings = load(KafkaSettings, environ={})
        self.published: list[tuple[str, str | None, Any]] = []
        self.dead: list[str] = []

    def publish(self, topic: str, key: str | None, message: Any) -> None:
        self.published.append((topic, key, message))

    def dead_letter(self, record: Any, reason: str, service: str | None = None) -> None:
        self.dead.append(reason)

    def on(self, topic: str) -> list[Any]:
        return [m for t, _, m in self.published if t == topic]


def record(offset: int = 0, topic: str = "requests") -> SimpleNamespace:
    return SimpleNamespace(topic=topic, partition=0, offset=offset, key=b"k", value=b"v")


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def assert_small(message: Any) -> None:
    assert message.ByteSize() < 2048, "a rejected value travelled into the event"


# -- scoring: prolif.score.requests ------------------------------------------------------------


class NoModels:
    def predict(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an invalid request reached the model server")

    def close(self) -> None:
        pass


def test_batch_scoring_refuses_request_ids_that_are_not_file_names(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.scoring.server import BatchScorer, ScoringServicer

    results = tmp_path / "box" / "results"
    settings = load(
        ScoringSettings,
        environ={},
        runtime=load(RuntimeSettings, environ={}, slide_roots=(SLIDES,), results_root=results),
        ray_readers=0,
    )
    bus = FakeBus()
    scorer = BatchScorer(settings, ScoringServicer(settings, NoModels()), bus)  # type: ignore[arg-type]
    hostile = [
        spb.ScoreRequest(request_id="../../escaped", path=str(CMU)),
        spb.ScoreRequest(request_id="/tmp/absolute", path=str(CMU)),
        spb.ScoreRequest(request_id=FIVE_MB, path=str(CMU)),
        spb.ScoreRequest(request_id="ok-nul", path=str(CMU) + "\x00"),
        spb.ScoreRequest(request_id="ok-big", path="/" + "p" * 100_000),
        spb.ScoreRequest(request_id="ok-slide", slide_id="../x", path=str(CMU)),
    ]
    scorer.handle([(record(i), r) for i, r in enumerate(hostile)])
    out = bus.on(settings.topic_results)
    assert [r.error.code for r in out] == ["INVALID_ARGUMENT"] * len(hostile)
    assert [r.request_id for r in out] == ["", "", "", "ok-nul", "ok-big", "ok-slide"]
    assert "request_id must match" in out[0].error.message
    assert "request_id is longer than 128 characters" in out[2].error.message
    assert "path contains the control or invisible character U+0000" in out[3].error.message
    assert "path is longer than 4096 bytes" in out[4].error.message
    statuses = bus.on(bus.settings.topic_status)
    assert len(statuses) == len(bus.dead) == len(hostile)
    for message in [*out, *statuses]:
        assert_small(message)
    assert all(s.stage == pb.STAGE_FAILED and not s.slide_id for s in statuses)
    # only the valid ids name result files, all inside the results root
    assert files_under(tmp_path / "box") == {
        Path("results"),
        *(Path("results") / f"ok-{n}.json" for n in ("nul", "big", "slide")),
    }


# -- training: prolif.train.requests -----------------------------------------------------------


def training_settings(tmp_path: Path) -> Any:
    from prolifscore.training.config import TrainingSettings

    return load(
        TrainingSettings,
        environ={},
        runtime=load(RuntimeSettings, environ={}, tiles_root=tmp_path / "tiles"),
        data_roots=(tmp_path / "data",),
        weights_roots=(tmp_path / "weights",),
        model_root=tmp_path / "models",
        runs_root=tmp_path / "runs",
    )


def test_training_requests_stay_inside_their_roots(tmp_path: Path) -> None:
    from prolifscore.training.runner import check_request

    s = training_settings(tmp_path)
    (tmp_path / "elsewhere").mkdir()

    def req(**fields: Any) -> tpb.TrainRequest:
        return tpb.TrainRequest(**{"request_id": "r", "model": "resnet50", **fields})

    assert check_request(req(dataset="mine"), s).dataset == str(tmp_path / "tiles" / "mine")
    inside = check_request(req(dataset=str(tmp_path / "data" / "tupac"), weights="w.h5"), s)
    assert inside.weights == str(tmp_path / "weights" / "w.h5")
    checkpoint = str(tmp_path / "runs" / "old" / "best.keras")  # an earlier run's checkpoint
    assert check_request(req(dataset="x", weights=checkpoint), s).weights == checkpoint
    assert check_request(req(dataset="x", weights="imagenet"), s).weights == "imagenet"
    for fields, field in [
        ({"dataset": "../elsewhere"}, "dataset"),
        ({"dataset": str(tmp_path / "elsewhere")}, "dataset"),
        ({"dataset": "/etc"}, "dataset"),
        ({"dataset": "x", "weights": "/etc/shadow"}, "weights"),
        ({"dataset": "x", "weights": str(tmp_path / "models" / "resnet50" / "1")}, "weights"),
    ]:
        with pytest.raises(OutsideRoots) as err:
            check_request(req(**fields), s)
        assert err.value.field == field and "outside the configured roots" in str(err.value)
    with pytest.raises(InvalidInput, match="request_id must match"):
        check_request(req(request_id="../escape", dataset="x"), s)


def test_training_service_answers_hostile_requests_without_writing_outside(tmp_path: Path) -> None:
    from prolifscore.training.server import TrainingService

    s = training_settings(tmp_path)
    bus = FakeBus()
    service = TrainingService(s, bus)  # type: ignore[arg-type]
    hostile = [
        tpb.TrainRequest(request_id="../../escaped", model="resnet50", dataset="x"),
        tpb.TrainRequest(request_id=FIVE_MB, model="resnet50", dataset="x"),
        tpb.TrainRequest(request_id="outside", model="resnet50", dataset="/etc"),
        tpb.TrainRequest(request_id="weights", model="resnet50", dataset="x", weights="/etc/x"),
        tpb.TrainRequest(request_id="nul", model="mitosis", dataset="x\x00"),
        tpb.TrainRequest(request_id="model", model="../../resnet50", dataset="x"),
    ]
    service.handle([(record(i), r) for i, r in enumerate(hostile)])
    out = bus.on(s.topic_models)
    assert len(out) == len(bus.dead) == len(hostile) and all(m.error for m in out)
    for message in out:
        assert_small(message)
    assert [m.request_id for m in out] == ["", "", "outside", "weights", "nul", "model"]
    assert [m.model for m in out] == ["resnet50"] * 4 + ["mitosis", ""]
    assert "dataset" in out[2].error and "outside the configured roots" in out[2].error
    assert out[3].error.startswith("weights ") and "U+0000" in out[4].error
    # nothing was trained, and only the valid ids have a run folder, inside the runs root
    assert {p.parts[0] for p in files_under(tmp_path)} == {"runs"}
    assert {p.name for p in (tmp_path / "runs").iterdir()} == {"outside", "weights", "nul", "model"}


# -- tiling: prolif.slides.ingest ---------------------------------------------------------------


def test_tiling_refuses_invalid_ingests_before_any_ray_task(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from prolifscore.tiling.config import TilingSettings
    from prolifscore.tiling.server import TilingService

    bus = FakeBus()
    service = TilingService(load(TilingSettings, environ={}), bus)  # type: ignore[arg-type]
    hostile = [
        pb.SlideIngest(slide_id="s1", path=str(CMU), run_id=FIVE_MB),
        pb.SlideIngest(slide_id="../../s2", path=str(CMU)),
        pb.SlideIngest(slide_id="s3", path=str(CMU) + "\x00"),
        pb.SlideIngest(slide_id="s4", path=str(CMU), spec=pb.TilingSpec(tile_size=10**6)),
    ]
    service.handle([(record(i, "ingest"), m) for i, m in enumerate(hostile)])  # no Ray needed
    statuses = bus.on(bus.settings.topic_status)
    assert [s.slide_id for s in statuses] == ["s1", "", "s3", "s4"]
    assert all(s.stage == pb.STAGE_FAILED for s in statuses) and len(bus.dead) == 4
    assert statuses[0].reason.startswith("run_id is longer than 128") and not statuses[0].run_id
    assert statuses[2].path == "" and "U+0000" in statuses[2].reason
    assert "spec.tile_size must be within [16, 4096]" in statuses[3].reason
    for status in statuses:
        assert_small(status)
