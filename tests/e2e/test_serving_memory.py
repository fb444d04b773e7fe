"""Memory stays bounded under sustained concurrent load: rounds of concurrent Predict calls on
the model server (batching on, as the Kubernetes deployment runs TF Serving) together with
concurrent slide scoring through the scoring service, both real processes. Neither process's
resident memory may keep growing: the last rounds are compared with the first rounds after
warm-up, with a tolerance (allocator and per-shape kernel caches fill over the first rounds,
then stay)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from prolifscore.localstack.stack import ServiceProcess
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc
from tests.modelserving import Client, predict_request
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.slow

WARMUP_ROUNDS, MEASURED_ROUNDS, COMPARED = 2, 8, 2
TOLERANCE = 0.10  # of the first measured rounds' RSS
# k8s/base/config/batching.config plus allowed_batch_sizes: merged batches take four shapes
BATCHING = """max_batch_size { value: 64 }
batch_timeout_micros { value: 5000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 2 }
allowed_batch_sizes: [8, 16, 32, 64]
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def processes(exported_root: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read a process's RSS")
    tmp = tmp_path_factory.mktemp("memory")
    root = exported_root  # the session's untrained models (read only)
    (tmp / "batching.config").write_text(BATCHING)
    models = ServiceProcess(
        "prolifscore.modelserver.server",
        {
            "PROLIF_MODEL_ROOT": str(root),
            "PROLIF_MODEL_SERVER_BATCHING": "true",
            "PROLIF_MODEL_SERVER_BATCHING_CONFIG": str(tmp / "batching.config"),
            "PROLIF_LOG_LEVEL": "WARNING",
        },
        tmp / "modelserver.log",
        port_env="PROLIF_MODEL_SERVER_PORT",
    ).start(timeout=180)
    scoring = ServiceProcess(
        "prolifscore.scoring.server",
        {
            "PROLIF_MODEL_SERVER": models.grpc_address,
            "PROLIF_SLIDE_ROOTS": str(SLIDES),
            "PROLIF_RESULTS_ROOT": str(tmp / "results"),
            "PROLIF_SCORING_KAFKA": "false",
            "PROLIF_SCORING_RAY_READERS": "0",
            "PROLIF_SCORING_STORE_RESULTS": "false",
            "PROLIF_LOG_LEVEL": "WARNING",
        },
        tmp / "scoring.log",
        port_env="PROLIF_SCORING_PORT",
    ).start(timeout=180)
    yield models, scoring
    for process in (scoring, models):
        process.stop()


def _round(client: Client, scorer: scoring_pb2_grpc.ScoringServiceStub) -> None:
    """The same work every round: 4 slides scored at once while 16 Predicts of 1-32 tiles
    (either model) arrive 8 at a time."""
    sizes = np.random.default_rng(7).integers(1, 33, 16)
    jobs = [
        ("resnet50" if i % 2 else "mitosis", np.full((n, 256, 256, 3), i * 9, np.uint8))
        for i, n in enumerate(sizes)
    ]
    slides = [
        spb.ScoreRequest(path=str(CMU), spec=pb.TilingSpec(max_tiles=24 + 8 * i)) for i in range(4)
    ]
    with ThreadPoolExecutor(12) as pool:
        scored = [pool.submit(scorer.ScoreSlide, r, timeout=600) for r in slides]
        answers = list(pool.map(lambda j: client.run(predict_request(*j)), jobs))
        results = [f.result() for f in scored]
    assert [len(a.outputs) for a in answers] == [1] * len(jobs)
    assert all(r.tiles_scored > 0 for r in results)


def _peak(client: Client) -> None:
    """Warm-up of the worst case: every allowed batch shape, and full batches of both models
    on all batch threads at once (the allocators' high-water mark), so that a later round
    that happens to line up big batches finds it reached."""
    sizes = [8, 16, 32, 64, 64, 64, 64, 64]
    jobs = [
        (m, np.zeros((n, 256, 256, 3), np.uint8)) for m in ("mitosis", "resnet50") for n in sizes
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda j: client.run(predict_request(*j)), jobs))


def test_rss_does_not_grow_round_after_round(processes) -> None:  # type: ignore[no-untyped-def]
    models, scoring = processes
    client = Client(models.grpc_port)
    channel = grpc.insecure_channel(scoring.grpc_address)
    scorer = scoring_pb2_grpc.ScoringServiceStub(channel)
    series: dict[str, list[float]] = {"model server": [], "scoring": []}
    try:
        _peak(client)
        for index in range(WARMUP_ROUNDS + MEASURED_ROUNDS):
            _round(client, scorer)
            if index >= WARMUP_ROUNDS:
                series["model server"].append(rss_mb(models.proc.pid))  # type: ignore[union-attr]
                series["scoring"].append(rss_mb(scoring.proc.pid))  # type: ignore[union-attr]
    finally:
        channel.close()
    for name, values in series.items():
        first, last = max(values[:COMPARED]), max(values[-COMPARED:])
        shown = ", ".join(f"{v:.0f}" for v in values)
        assert last <= first * (1 + TOLERANCE), f"{name} RSS grew (MB per round: {shown})"
