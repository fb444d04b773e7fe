"""`prolifscore view` as a user runs it after `make demo`: a slide file and the demo's output
folder; it prints the slide page's URL, serves it, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import json_format

from prolifscore.v1 import scoring_pb2 as spb
from tests.slides import CMU

pytestmark = pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")


def test_view_prints_the_slide_url_and_serves_the_demo_result(tmp_path: Path) -> None:
    demo = tmp_path / "demo-output"  # what `prolifscore demo` leaves behind
    (demo / "synthetic").mkdir(parents=True)
    score = spb.SlideScore(request_id="d1", slide_id=CMU.stem, tumor_score=2)
    score.probabilities.extend([0.3, 0.4, 0.3])
    (demo / "result.json").write_text(json.dumps(json_format.MessageToDict(score), indent=2))
    (demo / "heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (demo / "run.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROLIF_")}
    argv = ["view", str(CMU), "--results", str(demo), "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prolifscore.cli.main", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PROLIF_GRPC_PORT": "0", "PROLIF_METRICS_PORT": "0"},
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("viewer: http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
        url = line.removeprefix("viewer: ")
        assert url.endswith(f"/slide/{CMU.name}")
        page = urllib.request.urlopen(url, timeout=10).read()
        assert b"slide.js" in page
        api = url.replace("/slide/", "/api/slide/")
        info = json.loads(urllib.request.urlopen(api, timeout=10).read())
        assert info["result"]["tumor_score"] == 2 and info["result"]["has_heatmap"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
