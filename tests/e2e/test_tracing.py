"""One slide, one trace: `prolifscore ingest` -> tiling -> filtering -> shards, across two Kafka
hops between real processes. Every process appends its spans to one file (PROLIF_TRACING=file),
which the test reads once the CLI has seen the slide filtered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prolifscore.core.runtime.settings import to_env
from tests.harness import ServiceProcess, isolated_bus
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.slow


def read_spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_slide_is_one_trace_from_ingest_to_its_shards(broker, ray_head, tmp_path):
    bus = isolated_bus(broker.bootstrap, "trace")  # topics made with their partitions
    bus.close()
    spans_file = tmp_path / "spans.jsonl"
    env = {
        **to_env(bus.settings),
        "PROLIF_RAY_ADDRESS": ray_head.address,
        "PROLIF_SLIDE_ROOTS": str(SLIDES),
        "PROLIF_TILES_ROOT": str(tmp_path / "tiles"),
        "PROLIF_BATCH_SIZE": "8",
        "PROLIF_FILTER_WORKERS": "1",
        "PROLIF_TRACING": "file",
        "PROLIF_TRACING_FILE": str(spans_file),
    }
    services = [
        ServiceProcess(f"prolifscore.{name}.server", env, tmp_path / f"{name}.log").launch()
        for name in ("tiling", "filtering")
    ]
    try:
        for service in services:
            service.wait_serving(90)
        ingest = ["ingest", str(CMU), "--max-tiles", "16", "--wait", "--timeout", "120"]
        cli = subprocess.run(
            [sys.executable, "-m", "prolifscore.cli.main", *ingest],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert cli.returncode == 0, cli.stderr + cli.stdout
    finally:
        codes = {s.module: (s.stop(), s.tail()) for s in services}
    for module, (code, tail) in codes.items():
        assert code == 0, f"{module} did not stop cleanly:\n{tail}"

    spans = read_spans(spans_file)
    (ingest,) = [s for s in spans if s["name"] == "ingest slide"]
    (tiling,) = [s for s in spans if s["name"] == "tile slide"]
    batches = [s for s in spans if s["name"] == "filter batch"]
    assert ingest["service"] == "prolifscore-cli" and ingest["kind"] == "producer"
    assert tiling["service"] == "prolifscore-tiling" and tiling["kind"] == "consumer"
    assert {s["service"] for s in batches} == {"prolifscore-filtering"}
    # one trace: ingest -> tiling (first Kafka hop) -> every batch (second hop)
    assert {s["trace_id"] for s in [ingest, tiling, *batches]} == {ingest["trace_id"]}
    assert tiling["parent_id"] == ingest["span_id"] and tiling["remote_parent"]
    assert ingest["parent_id"] is None
    assert len(batches) == tiling["attributes"]["prolif.batches"] == 2  # 16 tiles, 8 a batch
    assert all(b["parent_id"] == tiling["span_id"] and b["remote_parent"] for b in batches)
    assert sorted(b["attributes"]["prolif.batch_index"] for b in batches) == [0, 1]
    slide_id = CMU.stem
    assert {s["attributes"]["prolif.slide_id"] for s in [ingest, tiling, *batches]} == {slide_id}
    shards = [b["attributes"].get("prolif.shard.path") for b in batches]
    assert all(p and Path(p).exists() for p in shards), shards
    assert sum("slide filtered" in b["events"] for b in batches) == 1  # the manifest's batch
    # written by three processes: the CLI and the two services
    assert tiling["pid"] == services[0].pid and {b["pid"] for b in batches} == {services[1].pid}
    assert ingest["pid"] not in (services[0].pid, services[1].pid)
