"""Slides in, tiles out: real broker, real tiling and filtering service processes, real slides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer
from PIL import Image

from prolifscore.core.runtime.codec import encode
from prolifscore.core.runtime.settings import PreprocessSettings, load, to_env
from prolifscore.core.wsi.preprocess import iter_kept_tiles, plan_slide
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tfrecord import parse_tile_example, read_records
from prolifscore.localstack.broker import free_port
from prolifscore.v1 import pipeline_pb2 as pb
from tests.harness import ServiceProcess, Watcher, all_final, final_status, isolated_bus
from tests.slides import BROKEN, CMU, KIDNEY, SLIDES, TCGA, write_blank_slide

pytestmark = pytest.mark.slow
BATCH = 8


@pytest.fixture(scope="module")
def pipeline(broker, ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    bus = isolated_bus(broker.bootstrap, "e2e")
    k = bus.settings
    (tmp / "slides").mkdir()
    env = {
        **to_env(k),
        "PROLIF_RAY_ADDRESS": ray_head.address,
        "PROLIF_SLIDE_ROOTS": f"{SLIDES},{tmp / 'slides'}",
        "PROLIF_TILES_ROOT": str(tmp / "tiles"),
        "PROLIF_BATCH_SIZE": str(BATCH),
    }
    tiling = ServiceProcess("prolifscore.tiling.server", env, tmp / "tiling.log").start()
    metrics_port = free_port()
    filtering = ServiceProcess(
        "prolifscore.filtering.server",
        {**env, "PROLIF_METRICS_PORT": str(metrics_port)},
        tmp / "filtering.log",
    ).start()
    status = Watcher(bus, k.topic_status, pb.SlideStatus, f"{k.client_id}-watch")
    yield {
        "k": k,
        "bus": bus,
        "tmp": tmp,
        "env": env,
        "status": status,
        "tiling": tiling,
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
    }
    status.close()
    codes = {svc.module: (svc.stop(), svc.tail()) for svc in (tiling, filtering)}
    bus.close()
    for module, (code, tail) in codes.items():
        assert code == 0, f"{module} did not stop cleanly on SIGTERM:\n{tail}"


def ingest(p, slide_id: str, path: Path | str, **fields) -> None:
    msg = pb.SlideIngest(slide_id=slide_id, path=str(path), **fields)
    p["bus"].publish(p["k"].topic_ingest, slide_id, msg)
    p["bus"].flush()


def send_json(p, *bodies: dict) -> None:
    """Ingest messages as a plain Kafka producer publishes them (`kcat -H
    content-type=application/json`), keyed by slide id, in order."""
    producer = KafkaProducer(bootstrap_servers=p["k"].bootstrap_servers)
    for body in bodies:
        producer.send(
            p["k"].topic_ingest,
            key=body["slideId"].encode(),
            value=json.dumps(body).encode(),
            headers=[("content-type", b"application/json")],
        )
    producer.flush()
    producer.close()


def shard_tiles(manifest_path: str) -> dict[tuple[int, int], dict]:
    manifest = json.loads(Path(manifest_path).read_text())
    tiles: dict[tuple[int, int], dict] = {}
    for shard in manifest["shards"]:
        for raw in read_records(Path(manifest_path).parent / shard["shard"]):
            ex = parse_tile_example(raw)
            key = (int(ex["col"]), int(ex["row"]))
            assert key not in tiles, f"tile {key} stored twice"
            tiles[key] = ex
    return tiles


def library_tiles(
    path: Path, slide_id: str, spec: pb.TilingSpec
) -> dict[tuple[int, int], np.ndarray]:
    with open_slide(path) as slide:
        plan = plan_slide(
            slide, slide_id, spec, load(PreprocessSettings, environ={}, batch_size=BATCH)
        )
        return {(t.col, t.row): px for t, px, _ in iter_kept_tiles(slide, plan)}


def test_readable_slides_through_the_services_equal_the_library(pipeline):
    # kidney-48-5 is a macro image with a speck of tissue: small tiles at native resolution.
    kidney_spec = pb.TilingSpec(tissue_threshold=0.5, target_mpp=0.25, tile_size=32)
    ingest(pipeline, "cmu", CMU, labels=pb.Labels(tumor_score=2, molecular_score=0.4))
    ingest(pipeline, "tcga", TCGA, labels=pb.Labels(tumor_score=3))
    ingest(pipeline, "kidney", KIDNEY, spec=kidney_spec)
    events = pipeline["status"].wait_for(all_final(["cmu", "tcga", "kidney"]), timeout=180)
    for slide_id, path, spec in [
        ("cmu", CMU, pb.TilingSpec()),
        ("tcga", TCGA, pb.TilingSpec()),
        ("kidney", KIDNEY, kidney_spec),
    ]:
        final = final_status(events, slide_id)
        assert final.stage == pb.STAGE_FILTERED, final.reason
        stored = shard_tiles(final.manifest_path)
        expected = library_tiles(path, slide_id, spec)
        assert stored.keys() == expected.keys() and len(stored) == final.kept_tiles > 0
        for key, ex in stored.items():
            assert np.array_equal(ex["image"], expected[key])
    cmu = next(iter(shard_tiles(final_status(events, "cmu").manifest_path).values()))
    assert (cmu["tumor_score"], round(cmu["molecular_score"], 3)) == (2, 0.4)
    tiled = [e for e in events if e.slide_id == "tcga" and e.stage == pb.STAGE_TILED]
    assert "no mpp or objective-power metadata" in tiled[0].warnings[0]


def test_bad_inputs_fail_with_reasons_and_dead_letters(pipeline):
    tmp = pipeline["tmp"]
    outside = tmp / "outside.svs"
    shutil.copy(CMU, outside)
    Image.new("RGB", (64, 64), "white").save(tmp / "slides" / "photo.png")
    bad = {
        "broken": BROKEN,
        "missing": SLIDES / "missing.svs",
        "outside": outside,
        "unsupported": tmp / "slides" / "photo.png",
    }
    for slide_id, path in bad.items():
        ingest(pipeline, slide_id, path)
    ingest(pipeline, "badlabel", CMU, labels=pb.Labels(tumor_score=4))
    p = pipeline["bus"]
    p.publish_bytes(pipeline["k"].topic_ingest, "garbage", b"\xff\x00not a protobuf")
    ingest(pipeline, "after-bad", CMU)  # the service goes on with the next slide
    ids = [*bad, "badlabel", "after-bad"]
    events = pipeline["status"].wait_for(all_final(ids), timeout=120)
    reasons = {s: final_status(events, s).reason for s in ids}
    assert final_status(events, "after-bad").stage == pb.STAGE_FILTERED
    assert "broken.svs" in reasons["broken"]
    assert "does not exist" in reasons["missing"]
    assert "outside the configured slide roots" in reasons["outside"]
    assert "photo.png" in reasons["unsupported"]
    assert "tumor_score must be 1, 2 or 3" in reasons["badlabel"]
    dlq = Watcher(p, pipeline["k"].topic_dlq, pb.DeadLetter, f"dlq-{uuid.uuid4().hex[:6]}")
    letters = dlq.wait_for(lambda items: len(items) >= 6, timeout=60)
    dlq.close()
    by_key = {d.key.decode(): d for d in letters}
    assert set(by_key) >= {*bad, "badlabel", "garbage"}
    assert "undecodable" in by_key["garbage"].error and by_key["garbage"].payload.startswith(
        b"\xff"
    )


def test_hostile_messages_fail_without_echo_and_nothing_escapes(pipeline):
    """A 5 MB run id, traversal in a slide id, a NUL byte in a path (protobuf and JSON), and a
    tile task whose spec hash climbs out of the tiles root: each one a FAILED status that does
    not repeat the offending value, a dead letter, and no file outside the roots; the next
    slide is processed."""
    k, bus, tmp = pipeline["k"], pipeline["bus"], pipeline["tmp"]
    ingest(pipeline, "big-run", CMU, run_id="r" * (5 << 20))
    bus.publish(
        k.topic_ingest, "trav", pb.SlideIngest(slide_id="../../../escaped-slide", path=str(CMU))
    )
    ingest(pipeline, "nul", str(CMU) + "\x00")
    body = json.dumps({"slideId": "json-nul", "path": str(CMU) + "\u0000"}).encode()
    bus.publish_bytes(k.topic_ingest, "json-nul", body, content_type="application/json")
    task = pb.TileTask(slide_id="task-escape", path=str(CMU), batch_count=1, run_id="hostile")
    task.spec.spec_hash, task.spec.tile_size, task.spec.read_size = (
        "/../../../../escaped-tile",
        256,
        256,
    )
    task.tiles.add(col=0, row=0)
    bus.publish(k.topic_tasks, "task-escape", task)
    ingest(pipeline, "after-hostile", CMU)
    named = ["big-run", "nul", "json-nul", "task-escape", "after-hostile"]
    events = pipeline["status"].wait_for(all_final(named), timeout=180)
    final = {s: final_status(events, s) for s in named}
    assert final["after-hostile"].stage == pb.STAGE_FILTERED
    assert final["big-run"].reason.startswith("run_id is longer than 128 characters")
    assert final["big-run"].run_id == "" and final["nul"].path == ""
    assert "U+0000" in final["nul"].reason and "U+0000" in final["json-nul"].reason
    assert final["task-escape"].reason.startswith("spec.spec_hash must be 1-64 hex digits")
    assert all(final[s].stage == pb.STAGE_FAILED for s in named[:-1])
    status_sizes = [len(r.value) for r in pipeline["status"].records]
    assert max(status_sizes) < 4096, "a rejected value travelled into a status event"
    dlq = Watcher(bus, k.topic_dlq, pb.DeadLetter, f"dlq-{uuid.uuid4().hex[:6]}")
    wanted = {b"big-run", b"trav", b"nul", b"json-nul", b"task-escape"}
    letters = dlq.wait_for(lambda items: wanted <= {d.key for d in items if d}, timeout=60)
    dlq.close()
    trav = next(d for d in letters if d and d.key == b"trav")
    assert (
        trav.error.startswith("slide_id must match") and b"../../../escaped-slide" in trav.payload
    )
    escaped = [*tmp.parent.rglob("escaped-slide*"), *tmp.parent.rglob("escaped-tile*")]
    assert not escaped, "a file was written outside the roots"


def test_ingest_cli_sends_a_folder_and_names_what_it_could_not_send(pipeline):
    folder = pipeline["tmp"] / "slides" / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(CMU, folder / "folder-cmu.svs")
    shutil.copy(BROKEN, folder / "sub" / "folder-broken.SVS")
    (folder / "README.md").write_text("not a slide")
    (folder / "sub" / "gone.svs").symlink_to(folder / "deleted.svs")
    env = {**pipeline["env"], "PROLIF_KAFKA_BOOTSTRAP": pipeline["k"].bootstrap_servers}
    out = subprocess.run(
        [sys.executable, "-m", "prolifscore.cli.main", "ingest", str(folder), "--wait"],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1, out.stderr  # one path not sent, one slide failed
    assert f"not sent: {folder / 'sub' / 'gone.svs'}: no such file" in out.stderr
    assert "published 2 slide(s)" in out.stderr and "1 path(s) not sent" in out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"folder-cmu", "folder-broken"}  # README.md is no slide
    assert rows["folder-cmu"][1] == "filtered" and rows["folder-broken"][1] == "failed"


def test_slide_without_tissue_completes_with_zero_tiles(pipeline):
    blank = write_blank_slide(pipeline["tmp"] / "slides" / "blank.tif")
    ingest(pipeline, "blank", blank)
    final = final_status(pipeline["status"].wait_for(all_final(["blank"])), "blank")
    assert final.stage == pb.STAGE_FILTERED and final.kept_tiles == 0 and not final.reason
    assert json.loads(Path(final.manifest_path).read_text())["shards"] == []


def test_json_ingest_from_a_plain_kafka_producer(pipeline):
    """What `kcat -H content-type=application/json` would send."""
    send_json(
        pipeline,
        {
            "slideId": "json-cmu",
            "path": str(CMU),
            "labels": {"tumorScore": 1},
            "spec": {"maxTiles": 5},
        },
    )
    final = final_status(pipeline["status"].wait_for(all_final(["json-cmu"])), "json-cmu")
    assert final.stage == pb.STAGE_FILTERED and 0 < final.kept_tiles <= 5
    tiles = shard_tiles(final.manifest_path)
    assert {ex["tumor_score"] for ex in tiles.values()} == {1}
    assert encode(pb.SlideIngest(slide_id="x"))[1]  # protobuf path still the default


def test_ingest_cli_waits_and_summarizes(pipeline):
    env = {**pipeline["env"], "PROLIF_KAFKA_BOOTSTRAP": pipeline["k"].bootstrap_servers}
    labels = pipeline["tmp"] / "labels.csv"
    labels.write_text("slide_id,tumor_score,molecular_score\ncmu-1-small-region,3,0.7\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prolifscore.cli.main",
            "ingest",
            str(CMU),
            str(BROKEN),
            "--labels",
            str(labels),
            "--wait",
            "--timeout",
            "120",
        ],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1, out.stderr  # one slide failed
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert rows["cmu-1-small-region"][1] == "filtered" and int(rows["cmu-1-small-region"][3]) > 0
    assert rows["broken"][1] == "failed"


def test_health_reflection_and_metrics(pipeline):
    """Health says SERVING, reflection lists the services, /metrics counts the work done."""
    import urllib.request

    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(pipeline["tiling"].grpc_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        names = {
            s.name
            for r in stub.ServerReflectionInfo(iter([req]))
            for s in r.list_services_response.service
        }
    assert "grpc.health.v1.Health" in names
    text = urllib.request.urlopen(pipeline["metrics"], timeout=5).read().decode()
    kept = [line for line in text.splitlines() if line.startswith('prolif_tiles_total{kind="kept"')]
    assert kept and float(kept[0].split()[-1]) > 0


def test_regions_of_interest_from_a_json_producer_get_their_own_shards(pipeline):
    """A JSON ingest with a region (TUPAC16's x,y,w,h rectangle as a ring) next to the same
    slide without one: the region's manifest holds only tiles centred in it, both sets of shards
    stay (different spec hashes), and they equal the library's tiles for each."""
    from prolifscore.core.wsi.roi import rectangle

    band = rectangle(1024, 512, 512, 1280)
    ring = {"xy": list(band.rings[0].xy)}
    send_json(
        pipeline,
        {"slideId": "roi-cmu", "path": str(CMU), "rois": []},
        {"slideId": "roi-cmu", "path": str(CMU), "rois": [{"rings": [ring]}]},
    )
    done = pipeline["status"].wait_for(
        lambda items: (
            len(
                {
                    e.manifest_path
                    for e in items
                    if e.slide_id == "roi-cmu" and e.stage == pb.STAGE_FILTERED
                }
            )
            >= 2
        ),
        timeout=120,
    )
    manifests = {
        e.manifest_path for e in done if e.slide_id == "roi-cmu" and e.stage == pb.STAGE_FILTERED
    }
    by_digest = {
        json.loads(Path(m).read_text())["spec"].get("roi_digest", ""): m for m in manifests
    }
    assert len(by_digest) == 2 and "" in by_digest
    region = next(m for d, m in by_digest.items() if d)
    whole, inside = shard_tiles(by_digest[""]), shard_tiles(region)
    with open_slide(CMU) as slide:
        defaults = load(PreprocessSettings, environ={}, batch_size=BATCH)
        plan = plan_slide(slide, "roi-cmu", pb.TilingSpec(), defaults, [band])
        expected = {(t.col, t.row) for t, _, _ in iter_kept_tiles(slide, plan)}
    assert inside.keys() == expected and 0 < len(inside) < len(whole)
    assert all(1024 <= c * 256 + 128 < 1536 and 512 <= r * 256 + 128 < 1792 for c, r in inside)
    assert Path(by_digest[""]).exists() and Path(region).exists()
