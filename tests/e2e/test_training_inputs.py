"""The training service process against hostile `prolif.train.requests` through a real broker: run
ids that climb out of the runs root or weigh 5 MB, data sets and weights outside the configured
roots, a NUL byte in a path. Each is announced as an error on `prolif.models` that does not
repeat the offending value, dead-lettered, and nothing is read or written outside the roots;
the service goes on with the next request."""

from __future__ import annotations

import uuid

import pytest

from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.settings import to_env
from prolifscore.localstack.stack import ServiceProcess
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import training_pb2 as tpb
from tests.harness import Watcher, isolated_kafka

pytestmark = pytest.mark.slow


def test_hostile_train_requests(broker, ray_head, tmp_path):
    k = isolated_kafka(broker.bootstrap, "train")
    suffix = uuid.uuid4().hex[:8]
    topics = {"requests": f"train.{suffix}.requests", "models": f"train.{suffix}.models"}
    box = tmp_path / "box"
    (box / "tiles" / "empty").mkdir(parents=True)
    env = {
        **to_env(k),
        "PROLIF_RAY_ADDRESS": ray_head.address,
        "PROLIF_TILES_ROOT": str(box / "tiles"),
        "PROLIF_DATA_ROOTS": str(box / "data"),
        "PROLIF_WEIGHTS_ROOTS": str(box / "weights"),
        "PROLIF_RUNS_ROOT": str(box / "runs"),
        "PROLIF_MODEL_ROOT": str(box / "models"),
        "PROLIF_TOPIC_TRAIN_REQUESTS": topics["requests"],
        "PROLIF_TOPIC_MODELS": topics["models"],
    }
    service = ServiceProcess("prolifscore.training.server", env, tmp_path / "training.log")
    service.start(timeout=180)
    bus = Bus(k, "test")
    try:
        bus.ensure_topics(list(topics.values()))
        train = tpb.TrainRequest
        hostile = [
            ("trav", train(request_id="../../escaped-run", model="mitosis", dataset="x")),
            ("big", train(request_id="b" * (5 << 20), model="mitosis", dataset="x")),
            ("etc", train(request_id="etc", model="resnet50", dataset="/etc")),
            ("w", train(request_id="w", model="resnet50", dataset="x", weights="/etc/x")),
            ("nul", train(request_id="nul", model="mitosis", dataset="x\x00")),
            ("empty", train(request_id="empty", model="resnet50", dataset="empty")),
        ]
        for key, request in hostile:
            bus.publish(topics["requests"], key, request)
        bus.flush()
        models = Watcher(bus, topics["models"], tpb.ModelPublished, f"m-{suffix}")
        got = models.wait_for(lambda items: len(items) >= len(hostile), 300)  # any order
        sizes = [len(r.value) for r in models.records]
        models.close()
        dlq = Watcher(bus, k.topic_dlq, pb.DeadLetter, f"d-{suffix}")
        letters = dlq.wait_for(lambda items: len(items) >= len(hostile), 60)
        dlq.close()
    finally:
        bus.close()
        code, tail = service.stop(), service.tail()
    assert code == 0, tail
    assert sorted(m.request_id for m in got) == ["", "", "empty", "etc", "nul", "w"]
    assert all(m.error and not m.trained for m in got) and max(sizes) < 4096
    error = {m.request_id: m.error for m in got if m.request_id}
    blank = sorted(m.error for m in got if not m.request_id)
    assert blank[0].startswith("request_id is longer than 128") and "must match" in blank[1]
    assert error["etc"].startswith("dataset ") and "outside the configured roots" in error["etc"]
    assert error["w"].startswith("weights ") and "U+0000" in error["nul"]
    assert "request_id" not in error["empty"]  # a valid request, failed by its empty data set
    assert {d.key for d in letters} == {key.encode() for key, _ in hostile}
    assert not list(tmp_path.parent.rglob("escaped-run*"))
    assert {p.name for p in (box / "runs").iterdir()} == {"etc", "w", "nul", "empty"}
