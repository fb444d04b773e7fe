"""The demo path end to end at reduced size (real broker, Ray, services, training, model server,
gRPC), and `prolifscore up | status | down` leaving no process behind.

Each test marks the environment of the command it starts with a unique variable; every process
the command starts inherits it (services, broker, Ray head, raylet, Ray workers), so scanning
the process table for the mark finds exactly that command's descendants, wherever they were
re-parented."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.slides import SLIDES

MARK = "PROLIF_TEST_PROCESS_MARK"
CLI = [sys.executable, "-m", "prolifscore.cli.main"]

pytestmark = pytest.mark.skipif(not SLIDES.is_dir(), reason=f"no sample slides at {SLIDES}")


def marked_processes(mark: str) -> list[str]:
    """`pid command` of every live process whose environment carries `MARK=mark`."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is gone; only its parent has not reaped it yet
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(f"{entry.name} {cmd[:120]}")
    return found


def assert_no_process_left(mark: str, grace: float = 15.0) -> None:
    deadline = time.monotonic() + grace
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes left behind:\n" + "\n".join(left)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_scores_a_real_slide_end_to_end(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("cmu-1-small-region.svs", "broken.svs"):
        shutil.copy(SLIDES / name, slides / name)
    out = tmp_path / "demo-output"
    mark = uuid.uuid4().hex
    # Reduced size: 9 small synthetic slides (one held out per score), 3 mitosis cases,
    # 32 px tumor input, one epoch.
    args = ["demo", "--slides", str(slides), "--out", str(out), "--synthetic-slides", "9"]
    args += ["--synthetic-size", "1024", "--mitosis-cases", "3", "--mitosis-regions", "2"]
    args += ["--input-size", "32", "--epochs", "1"]
    proc = subprocess.run(
        [*CLI, *args],
        env={**os.environ, MARK: mark},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The result as one JSON object, then the command that opens the scored slide in the viewer.
    lines = proc.stdout.strip().splitlines()
    cli, verb, slide, flag, results = lines[-1].split()
    assert (Path(cli).name, verb, flag) == ("prolifscore", "view", "--results")
    assert (tmp_path / slide).resolve().stem == "cmu-1-small-region"  # paths work from cwd
    stored = json.loads(next((tmp_path / results).glob("cmu-1-small-region/*.json")).read_text())
    assert stored["tiles"] and stored["slideId"] == "cmu-1-small-region"  # overlays have tiles
    last = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    assert last["slide_id"] == "cmu-1-small-region"
    assert last["tumor_score"] in (1, 2, 3) and last["mitotic_score"] in (1, 2, 3)
    assert len(last["probabilities"]) == 3 and abs(sum(last["probabilities"]) - 1) < 0.01
    index = sum((k + 1) * p for k, p in enumerate(last["probabilities"]))
    assert last["proliferation_index"] == pytest.approx(index, abs=1e-3)
    if last["score_rule"] == "argmax":
        assert last["tumor_score"] == 1 + max(range(3), key=lambda i: last["probabilities"][i])
    else:  # the quick model's exported cut points, applied to the index
        assert last["score_rule"] == "cutpoints"
    assert last["fused_score"] in (1, 2, 3)
    assert last["tiles_scored"] > 0
    # The versions the training service just exported, served by the model server.
    assert last["models"] == {"resnet50": 1, "mitosis": 1}
    for model in ("resnet50", "mitosis"):
        version = out / "models" / model / "1"
        assert (version / "saved_model.pb").is_file()
        assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()

    # The files the demo promises, consistent with what it printed.
    full = json.loads((out / "result.json").read_text())
    assert full["slideId"] == last["slide_id"] and full.get("tumorScore") == last["tumor_score"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    stages = run["slides"]
    assert stages["broken"] == "failed"  # reported, and the demo went on
    assert stages["cmu-1-small-region"] == "filtered"
    assert [s for s in stages if s.startswith("SYN-")] == [f"SYN-{k:03d}" for k in range(1, 10)]
    assert all(stages[s] == "filtered" for s in stages if s.startswith("SYN-"))
    assert set(run["timings"]) >= {"startup_s", "preprocess_s", "train_s", "score_s", "total_s"}
    assert "cmu-1-small-region" in proc.stdout and "tumor score" in proc.stdout  # the table
    assert_no_process_left(mark)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_up_status_down_leave_no_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [*CLI, "up", "--run-dir", str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 420
        while not (run_dir / "stack.json").exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "stack not up in 420 s"
            time.sleep(1)
        state = json.loads((run_dir / "stack.json").read_text())
        assert set(state["services"]) == {
            "modelserver",
            "tiling",
            "filtering",
            "training",
            "scoring",
            "viewer",
        }
        assert state["viewer"].startswith("http://127.0.0.1:")
        for address in [state["broker"], state["ray"], *state["services"].values()]:
            assert address.startswith("127.0.0.1:")

        status = subprocess.run(
            [*CLI, "status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stderr
        lines = {line.split()[0]: line for line in status.stdout.splitlines()}
        for name in state["services"]:
            assert lines[name].endswith("SERVING"), status.stdout
        assert len(marked_processes(mark)) >= 7  # up + broker + Ray + five services at least

        down = subprocess.run(
            [*CLI, "down", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=180
        )
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        assert not (run_dir / "stack.json").exists()
        after = subprocess.run(
            [*CLI, "status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60
        )
        assert after.returncode == 1 and "not running" in after.stdout
        assert_no_process_left(mark)
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
