"""Fault injection with real processes: kill -9 the broker, tiling, filtering, a filter actor,
scoring and the model server in the middle of work; records whose handler always raises; a
restart that fails; an in-memory broker that comes back empty; a duplicate delivery.

Each test asserts what users see: the failure is reported where they look (status events,
`prolifscore status`, CLI exit codes, gRPC health, `prolif_broker_up`, dead letters), nothing is
lost or stored twice in the shards, and the service goes on with the next item. The stack under
test is the one `prolifscore up` runs (`EmbeddedStack` + `Supervisor`) on the session's Ray head;
the tests call the supervisor's checks themselves, so they can look at an outage before the
restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from prolifscore.cli.ingest import follow
from prolifscore.cli.up import write_state
from prolifscore.core.runtime import inflight
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.delivery import Delivery, Transient
from prolifscore.core.runtime.events import SlideEvents
from prolifscore.core.runtime.service import LIVENESS
from prolifscore.core.runtime.settings import KafkaSettings, to_env
from prolifscore.core.wsi.leftovers import temporary_for
from prolifscore.localstack.broker import EmbeddedBroker
from prolifscore.localstack.stack import EmbeddedStack
from prolifscore.localstack.supervisor import Supervisor
from prolifscore.scoring.config import ScoringSettings
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc
from tests.e2e.test_pipeline_e2e import BATCH, library_tiles, shard_tiles
from tests.harness import Watcher, isolated_kafka
from tests.slides import CMU, SLIDES

CLI = [sys.executable, "-m", "prolifscore.cli.main"]
SEED = pb.TilingSpec(tissue_mode=pb.TISSUE_MODE_SEED)  # every grid tile checked: batches last
FAST = pb.TilingSpec()
# Low group timeouts (Tansu's join takes about half the session timeout), two partitions.
KAFKA_ENV = {
    "PROLIF_TOPIC_PARTITIONS": "2",
    "PROLIF_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "PROLIF_KAFKA_MAX_POLL_INTERVAL_MS": "8000",
    "PROLIF_KAFKA_CONNECT_TIMEOUT_S": "60",
}


def own_names() -> dict[str, str]:
    """Topic and group names of one stack's own. Its broker takes a free port; any client still
    pointed at that port (a process some other run left behind) must not share its work."""
    run = uuid.uuid4().hex[:8]
    topics = ("INGEST", "TASKS", "SHARDS", "STATUS", "DLQ", "SCORE_REQUESTS", "SCORE_RESULTS")
    groups = ("TILING", "FILTERING", "SCORING")
    return {
        **{f"PROLIF_TOPIC_{t}": f"faults.{run}.{t.lower()}" for t in topics},
        **{f"PROLIF_{g}_GROUP": f"faults-{run}-{g.lower()}" for g in groups},
    }


# --------------------------------------------------------------------------------------------
# Helpers.


def wait_until(what: str, pred: Callable[[], Any], timeout: float = 120.0, every: float = 0.3):
    """Poll `pred` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def metric(proc: Any, name: str, labels: str = "") -> float | None:
    """A sample of a service's /metrics (port from its latest "service started" log line)."""
    port = None
    for line in reversed(proc.log_path.read_text(errors="replace").splitlines()):
        if '"service started"' in line:
            port = json.loads(line)["metrics"].rsplit(":", 1)[1]
            break
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read()
    except (OSError, ValueError):
        return None
    for line in text.decode().splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.split()[-1])
    return None


def status_cli(run_dir: Path) -> tuple[int, dict[str, str]]:
    """`prolifscore status`: its exit code and each component's line."""
    out = subprocess.run(
        [*CLI, "status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    return out.returncode, {line.split()[0]: line for line in out.stdout.splitlines() if line}


def actor_pids(session: int, cls: str = "BatchFilter") -> set[int]:
    """PIDs of the Ray actors of class `cls` under the Ray head whose session id is `session`."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().split()[5]) != session:
                continue
            if (entry / "cmdline").read_bytes().startswith(f"ray::{cls}".encode()):
                found.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def assert_exact_shards(final: pb.SlideStatus, slide_id: str, spec: pb.TilingSpec) -> None:
    """FILTERED, every tile the library keeps stored exactly once, no temporary left."""
    assert final.stage == pb.STAGE_FILTERED, final.reason
    stored = shard_tiles(final.manifest_path)  # raises if a tile is stored twice
    expected = library_tiles(CMU, slide_id, spec)
    assert stored.keys() == expected.keys() and final.kept_tiles == len(expected) > 0
    folder = Path(final.manifest_path).parent
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


class Pipeline:
    """A supervised stack (broker, tiling, filtering) with a view of its status topic."""

    def __init__(self, stack: EmbeddedStack, reports: list[str]) -> None:
        self.stack = stack
        self.reports = reports
        self.supervisor = Supervisor(stack, report=reports.append)
        self.k = stack.settings(KafkaSettings)
        self.bus = Bus(self.k, "test")
        topics = ("ingest", "tasks", "shards", "status", "dlq")
        self.bus.ensure_topics([getattr(self.k, f"topic_{t}") for t in topics])
        self.status = Watcher(self.bus, self.k.topic_status, pb.SlideStatus, "test-status")
        self.view = SlideEvents()
        self.fresh: list[pb.SlideStatus] = []  # every event once (repeats dropped)

    @property
    def run_dir(self) -> Path:
        return self.stack.run_dir

    @property
    def tiles(self) -> Path:
        return Path(self.stack.env["PROLIF_TILES_ROOT"])

    def ingest(self, slide_id: str, spec: pb.TilingSpec = FAST, key: str = "") -> None:
        msg = pb.SlideIngest(slide_id=slide_id, path=str(CMU), spec=spec)
        self.bus.publish(self.k.topic_ingest, key or slide_id, msg)
        self.bus.flush()

    def events(self) -> list[pb.SlideStatus]:
        """Every status event so far (repeats included)."""
        before = len(self.status.items)
        self.status.pump(timeout_ms=200)
        self.fresh += self.view.extend(self.status.items[before:])
        return [e for e in self.status.items if e is not None]

    def count(self, slide_id: str, stage: int = pb.STAGE_FILTERING) -> int:
        return sum(1 for e in self.events() if e.slide_id == slide_id and e.stage == stage)

    def final(self, slide_id: str, timeout: float = 180.0) -> pb.SlideStatus:
        def done() -> pb.SlideStatus | None:
            self.events()
            return self.view.final(slide_id)

        return wait_until(f"{slide_id} FILTERED or FAILED", done, timeout)

    def heal(self, timeout: float = 180.0) -> None:
        """Let the supervisor restart whatever is down until every service says SERVING."""

        def healthy() -> bool:
            self.supervisor.check()
            procs = self.stack.processes.values()
            return all(p.alive() and p.health() == "SERVING" for p in procs)

        wait_until("every component SERVING", healthy, timeout, every=1.0)

    def close(self) -> None:
        self.status.close()
        self.bus.close()
        self.stack.stop()


def pipeline_stack(
    run_dir: Path, ray_address: str, durable: bool, **extra_env: str
) -> EmbeddedStack:
    env = {
        **KAFKA_ENV,
        **own_names(),
        "PROLIF_SLIDE_ROOTS": str(SLIDES),
        "PROLIF_TILES_ROOT": str(run_dir.parent / "tiles"),
        "PROLIF_BATCH_SIZE": str(BATCH),  # library_tiles' batch size (it is in the spec hash)
        "PROLIF_KAFKA_MAX_POLL_RECORDS": "1",  # commit batch by batch: kills land mid-slide
        "PROLIF_FILTER_WORKERS": "1",
        "PROLIF_TEST_FAIL_KEY": "poison",  # test-only: records keyed "poison" make handlers raise
        **extra_env,
    }
    return EmbeddedStack(
        run_dir,
        env=env,
        services=("tiling", "filtering"),
        broker_storage=run_dir / "broker" if durable else None,
        ray_address=ray_address,
    ).start()


@pytest.fixture(scope="module")
def supervised(ray_head, tmp_path_factory) -> Iterator[Pipeline]:
    """The durable default, as `prolifscore up` runs it."""
    stack = pipeline_stack(tmp_path_factory.mktemp("faults") / "run", ray_head.address, True)
    p = Pipeline(stack, [])
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pipeline(supervised: Pipeline) -> Pipeline:
    """The module's stack, whole again whatever an earlier test left down."""
    supervised.heal()
    return supervised


# --------------------------------------------------------------------------------------------
# Broker loss.


@pytest.mark.slow
def test_broker_killed_mid_slide_is_reported_and_durable_storage_keeps_the_work(pipeline):
    p = pipeline
    p.ingest("b-kill", SEED)
    wait_until("two batches filtered", lambda: p.count("b-kill") >= 2)
    write_state(p.run_dir, p.supervisor)  # stack.json as `prolifscore up` writes it
    dead = p.stack.broker.pid  # type: ignore[union-attr]
    os.kill(dead, signal.SIGKILL)

    # Before any restart, every place users look says so; liveness does not (a restart would
    # not bring the broker back).
    for name, proc in p.stack.processes.items():
        wait_until(f"{name} NOT_SERVING", lambda s=proc: s.health() == "NOT_SERVING")
        wait_until(f"{name} broker gauge 0", lambda s=proc: metric(s, "prolif_broker_up") == 0)
        assert proc.health(service=LIVENESS) == "SERVING", name
    code, lines = status_cli(p.run_dir)
    assert code == 0 and f"DOWN (pid {dead} gone)" in lines["broker"], lines
    for name, proc in p.stack.processes.items():
        assert f" {proc.pid} " in lines[name] and lines[name].endswith("NOT_SERVING"), lines
    assert p.view.final("b-kill") is None, "killed too late: the slide was already done"

    p.heal()  # the supervisor restarts the broker on its port and storage
    assert any("nothing was lost" in r for r in p.reports), p.reports
    assert_exact_shards(p.final("b-kill"), "b-kill", SEED)
    write_state(p.run_dir, p.supervisor)
    code, lines = status_cli(p.run_dir)
    components = ["stack", "broker", "ray", *p.stack.processes]
    assert code == 0 and all(lines[c].endswith("SERVING") for c in components), lines
    assert "durable in" in lines["(broker"]
    assert all(metric(proc, "prolif_broker_up") == 1 for proc in p.stack.processes.values())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_in_memory_broker_restart_says_what_was_lost_and_ingest_wait_ends(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    # Tiling is mid-slide when the broker comes back empty; its producer then retries its
    # records forever (UnknownProducerIdError), so its SIGTERM shutdown never finishes and the
    # supervisor's restart waited its full 10 s before SIGKILL. A 3 s grace lets it give up
    # (exit 1, uncommitted: the work is lost either way, and reported) sooner.
    p = Pipeline(
        pipeline_stack(run_dir, ray_head.address, durable=False, PROLIF_SHUTDOWN_GRACE_S="3"), []
    )
    cli_env = {**os.environ, **to_env(p.k)}
    cli = subprocess.Popen(
        [*CLI, "ingest", str(CMU), "--wait", "--tissue-mode", "seed", "--run-id", "lost"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        slide = CMU.stem

        def in_flight() -> bool:  # tiled, not yet FILTERED
            return [r["slide_id"] for r in inflight.pending(p.tiles)] == [slide]

        wait_until("the slide in flight", in_flight, timeout=150, every=0.01)
        os.kill(p.stack.broker.pid, signal.SIGKILL)  # type: ignore[union-attr]
        wait_until("the broker gone", lambda: not p.supervisor.alive("broker"))
        p.heal()
        said = "\n".join(p.reports)
        assert "RESTARTED EMPTY" in said and slide in said, said
        assert inflight.pending(p.tiles) == []
        _, err = cli.communicate(timeout=120)
        assert cli.returncode == 3, err[-2000:]
        assert f"Kafka broker {p.k.bootstrap_servers} lost its records" in err, err[-2000:]
        # the slide's failure is an event on the new broker, with the reason
        after = Watcher(p.bus, p.k.topic_status, pb.SlideStatus, f"after-{uuid.uuid4().hex[:6]}")
        events = after.wait_for(lambda items: any(e and e.slide_id == slide for e in items), 60)
        after.close()
        failed = next(e for e in events if e and e.slide_id == slide)
        assert failed.stage == pb.STAGE_FAILED and failed.run_id == "lost"
        assert "in-memory storage" in failed.reason and failed.service == "stack"
    finally:
        if cli.poll() is None:
            cli.kill()
        p.close()


def test_ingest_wait_gives_up_on_an_unreachable_broker(tmp_path):
    broker = EmbeddedBroker().start()
    env = {**os.environ, **KAFKA_ENV, **own_names(), "PROLIF_KAFKA_BOOTSTRAP": broker.bootstrap}
    cli = subprocess.Popen(
        [*CLI, "ingest", str(CMU), "--wait", "--broker-timeout", "3"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert cli.stderr is not None
        said = ""
        while "filtering" not in said:  # the progress bar: following has begun
            char = cli.stderr.read(1)
            assert char, f"the CLI ended early: {said}"
            said += char
        assert said.startswith("published 1 slide"), said
        broker.stop()  # no services, no supervisor: nothing will ever answer
        _, err = cli.communicate(timeout=120)
        assert cli.returncode == 3, err[-2000:]
        assert f"Kafka broker {broker.bootstrap} unreachable for" in err, err[-2000:]
    finally:
        if cli.poll() is None:
            cli.kill()
        broker.stop()


# --------------------------------------------------------------------------------------------
# Services killed mid-work.


@pytest.mark.slow
def test_tiling_killed_mid_work_every_slide_once(pipeline):
    p = pipeline
    slides = ["t-1", "t-2", "t-3"]
    for s in slides:
        p.ingest(s)
    wait_until("a slide tiled", lambda: any(p.count(s, pb.STAGE_TILED) for s in slides))
    p.stack.processes["tiling"].kill(signal.SIGKILL)
    p.heal()
    for s in slides:
        assert_exact_shards(p.final(s), s, FAST)
        assert sum(1 for e in p.fresh if e.slide_id == s and e.stage == pb.STAGE_TILED) == 1


@pytest.mark.slow
def test_filtering_killed_mid_batch_leaves_no_temporary(pipeline):
    p = pipeline
    p.ingest("f-kill", SEED)
    folder = p.tiles / "f-kill"
    wait_until("a batch filtered", lambda: p.count("f-kill") >= 1)
    # What a writer killed before its rename leaves, as old as a crash a minute ago.
    planted = temporary_for(folder / "f-kill-leaked-b00000-of-00001.tfrecord")
    planted.write_bytes(b"half a shard")
    os.utime(planted, (time.time() - 60, time.time() - 60))
    p.stack.processes["filtering"].kill(signal.SIGKILL)
    p.heal()
    assert_exact_shards(p.final("f-kill"), "f-kill", SEED)
    assert not planted.exists()  # removed when filtering started again


@pytest.mark.slow
def test_filter_actor_killed_is_replaced_and_its_batch_redone(pipeline, ray_head):
    p = pipeline
    (actor,) = wait_until("one filter actor", lambda: actor_pids(ray_head.proc.pid))
    p.ingest("a-kill", SEED)
    folder = p.tiles / "a-kill"
    wait_until("a shard being written", lambda: list(folder.glob(".*.tmp")), every=0.01)
    os.kill(actor, signal.SIGKILL)  # mid-batch
    replaced = wait_until("a new filter actor", lambda: actor_pids(ray_head.proc.pid) - {actor})
    assert len(replaced) == 1  # the pool is back to full strength (one worker configured)
    assert_exact_shards(p.final("a-kill"), "a-kill", SEED)
    filtering = p.stack.processes["filtering"]
    assert (metric(filtering, "prolif_retries_total", 'cause="error"') or 0) >= 1


@pytest.mark.slow
def test_a_restart_that_fails_is_retried_and_the_rest_keeps_running(pipeline, tmp_path):
    p = pipeline
    tiling = p.stack.processes["tiling"]
    log_path = tiling.log_path
    tiling.log_path = tmp_path / "no-such-folder" / "tiling.log"  # its restart will raise
    tiling.kill(signal.SIGKILL)
    state = p.supervisor.components["tiling"]

    def tried() -> bool:
        p.supervisor.check()
        return "restart failed" in state.last_error

    wait_until("the restart reported failed", tried)
    assert "FileNotFoundError" in state.last_error and state.retry_at > time.monotonic()
    assert state.state.startswith("down:") and any("restart failed" in r for r in p.reports)
    assert p.supervisor.alive("broker") and p.stack.processes["filtering"].alive()
    p.supervisor.check()  # within the backoff: not tried again
    assert not tiling.alive()
    tiling.log_path = log_path
    p.heal()
    assert p.supervisor.components["tiling"].state == "running"
    p.ingest("after-restart")
    assert p.final("after-restart").stage == pb.STAGE_FILTERED


# --------------------------------------------------------------------------------------------
# Poison records and duplicate events.


@pytest.mark.slow
def test_poison_slide_is_dead_lettered_after_max_attempts_and_the_next_goes_on(pipeline):
    p = pipeline
    dlq = Watcher(p.bus, p.k.topic_dlq, pb.DeadLetter, f"dlq-{uuid.uuid4().hex[:6]}")
    p.ingest("poisoned", key="poison")  # every handler of this record raises
    p.ingest("after-poison")
    failed = p.final("poisoned")
    assert failed.stage == pb.STAGE_FAILED and failed.service == "tiling"
    assert "gave up after 3 attempts" in failed.reason and "injected fault" in failed.reason
    letters = dlq.wait_for(lambda items: any(d and d.key == b"poison" for d in items), 60)
    dlq.close()
    letter = next(d for d in letters if d and d.key == b"poison")
    assert letter.attempts == 3 and letter.service == "tiling" and "injected fault" in letter.error
    assert pb.SlideIngest.FromString(letter.payload).slide_id == "poisoned"
    assert_exact_shards(p.final("after-poison"), "after-poison", FAST)


@pytest.mark.slow
def test_a_redelivered_slide_reports_the_same_events_and_views_count_them_once(pipeline):
    p = pipeline
    p.ingest("dup")
    first = p.final("dup")
    manifest = Path(first.manifest_path)
    before = shard_tiles(str(manifest))
    shards = sorted(f.name for f in manifest.parent.iterdir())
    ids = {e.event_id for e in p.events() if e.slide_id == "dup"}
    p.ingest("dup")  # the same record again, as a redelivery after a crash would bring it
    # Tiled again, every batch redone (each now finds all markers: FILTERED again).
    redone = 1 + first.batch_count
    wait_until("redone", lambda: p.count("dup", pb.STAGE_FILTERED) == first.batch_count + 1)
    again = [e for e in p.events() if e.slide_id == "dup"][len(ids) :]
    assert len(again) == redone and {e.event_id for e in again} <= ids
    assert sum(1 for e in p.fresh if e.slide_id == "dup") == len(ids)
    # The CLI's progress counts each batch once; the shards are the same files, same tiles.
    progress = follow(p.bus, p.k, "", ["dup"], timeout=60)["dup"]
    assert progress.stage == "filtered" and len(progress.done) == first.batch_count
    assert progress.kept == first.kept_tiles
    assert sorted(f.name for f in manifest.parent.iterdir()) == shards
    assert shard_tiles(str(manifest)).keys() == before.keys()


def test_one_poison_record_in_a_batch_takes_no_good_record_with_it(broker):
    """The consumer loop's retries, in process: a handler that always raises for one record,
    one that fails transiently more often than the attempt limit, and good records around."""
    k = isolated_kafka(broker.bootstrap, "poison", partitions=1, max_poll_records=8)
    bus = Bus(k, "test")
    bus.ensure_topics([k.topic_ingest, k.topic_dlq])
    for i in range(6):
        bus.publish(k.topic_ingest, f"k{i}", pb.SlideIngest(slide_id=f"k{i}"))
    bus.flush()
    handled: list[str] = []
    abandoned: list[str] = []
    flaky = {"k4": 4}  # more transient failures than PROLIF_MAX_ATTEMPTS (3)

    def handle(items: list[tuple[Any, pb.SlideIngest]]) -> None:
        for _, msg in items:
            if msg.slide_id == "k2":
                raise ValueError("this record always breaks the handler")
            if flaky.get(msg.slide_id):
                flaky[msg.slide_id] -= 1
                raise Transient("dependency unreachable")
        handled.extend(m.slide_id for _, m in items)

    consumer = bus.consumer([k.topic_ingest], f"{k.client_id}-loop")

    def abandon(_record: Any, msg: pb.SlideIngest, _reason: str) -> None:
        abandoned.append(msg.slide_id)

    delivery = Delivery("test", bus, consumer, pb.SlideIngest, handle, abandon)
    try:

        def settled() -> bool:
            records = consumer.poll(timeout_ms=500)
            if records:
                delivery.process(records)
            return {"k0", "k1", "k3", "k4", "k5"} <= set(handled) and bool(abandoned)

        wait_until("every good record handled", settled, timeout=90, every=0)
        bus.publish(k.topic_ingest, "k6", pb.SlideIngest(slide_id="k6"))  # goes on afterwards
        bus.flush()
        wait_until("the next record", lambda: settled() and "k6" in handled, timeout=60, every=0)
    finally:
        consumer.close()
    assert abandoned == ["k2"] and "k2" not in handled
    dlq = Watcher(bus, k.topic_dlq, pb.DeadLetter, f"{k.client_id}-dlq")
    (letter,) = dlq.wait_for(lambda items: len(items) >= 1, 30)
    dlq.close()
    bus.close()
    assert letter.key == b"k2" and letter.attempts == 3
    assert "ValueError: this record always breaks the handler" in letter.error


# --------------------------------------------------------------------------------------------
# Scoring and the model server.


@pytest.fixture(scope="module")
def scoring(ray_head, exported_root, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("faults-scoring")
    env = {
        **KAFKA_ENV,
        **own_names(),
        "PROLIF_MODEL_ROOT": str(exported_root),  # the session's untrained models (read only)
        "PROLIF_SLIDE_ROOTS": str(SLIDES),
        "PROLIF_RESULTS_ROOT": str(tmp / "results"),
        "PROLIF_PREDICT_BATCH": "8",
        "PROLIF_MODEL_RETRIES": "0",  # an unreachable model server fails the attempt at once
    }
    stack = EmbeddedStack(
        tmp / "run", env=env, services=("modelserver", "scoring"), ray_address=ray_head.address
    ).start()
    p = Pipeline(stack, [])
    s = stack.settings(ScoringSettings)
    p.bus.ensure_topics([s.topic_requests, s.topic_results])
    results = Watcher(p.bus, s.topic_results, spb.ScoreResult, "test-results")
    try:
        yield {"p": p, "s": s, "results": results, "tmp": tmp}
    finally:
        results.close()
        p.close()


def score_request(scoring: dict[str, Any], request_id: str) -> None:
    bus = scoring["p"].bus
    request = spb.ScoreRequest(request_id=request_id, path=str(CMU), skip_mitosis=True)
    bus.publish(scoring["s"].topic_requests, request_id, request)
    bus.flush()


def results_of(scoring: dict[str, Any], request_id: str) -> list[spb.ScoreResult]:
    watcher = scoring["results"]
    watcher.pump()
    return [r for r in watcher.items if r is not None and r.request_id == request_id]


@pytest.mark.slow
def test_model_server_killed_mid_request_is_waited_for_not_dead_lettered(scoring):
    p = scoring["p"]
    models, scorer = p.stack.processes["modelserver"], p.stack.processes["scoring"]
    models.kill(signal.SIGKILL)
    score_request(scoring, "m-kill")
    # More failed tries than PROLIF_MAX_ATTEMPTS, none counted against the request.
    wait_until(
        "transient retries",
        lambda: (metric(scorer, "prolif_retries_total", 'cause="transient"') or 0) >= 4,
    )
    assert not results_of(scoring, "m-kill")
    p.heal()  # the model server back on its address
    result = wait_until("the result", lambda: results_of(scoring, "m-kill"), timeout=120)[0]
    assert not result.HasField("error") and result.score.tiles_scored > 0
    assert metric(scorer, "prolif_dead_letters_total") in (None, 0.0)


@pytest.mark.slow
def test_scoring_killed_mid_request_the_result_still_comes_once_stored(scoring):
    p = scoring["p"]
    scorer = p.stack.processes["scoring"]
    seen: list[Any] = []

    def stream() -> None:
        with grpc.insecure_channel(scorer.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            request = spb.ScoreRequest(request_id="grpc-kill", path=str(CMU))
            try:
                for message in stub.StreamScoreSlide(request, timeout=120):
                    seen.append(message)
            except grpc.RpcError as exc:
                seen.append(exc.code())  # type: ignore[attr-defined]

    caller = threading.Thread(target=stream)
    caller.start()
    score_request(scoring, "s-kill")
    wait_until("scoring under way", lambda: seen)
    scorer.kill(signal.SIGKILL)
    caller.join(timeout=60)
    assert seen[-1] == grpc.StatusCode.UNAVAILABLE  # what an interactive client sees
    p.heal()
    results = wait_until("the result", lambda: results_of(scoring, "s-kill"), timeout=120)
    assert not results[0].HasField("error") and results[0].score.tiles_scored > 0
    assert all(r == results[0] for r in results)  # a redone request republishes what it stored
    stored = json.loads((scoring["tmp"] / "results" / "s-kill.json").read_text())
    assert stored["requestId"] == "s-kill"
