"""`prolifscore score --local`: in-process scoring, no service; an untrained model's result
carries a warning, never passes for a score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prolifscore.cli.main import main
from tests.slides import CMU

pytest.importorskip("tensorflow")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_local_score_flags_untrained_models(
    exported_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    root = exported_root  # the session's untrained models (read only)
    heat = tmp_path / "heat.png"
    argv = ["score", str(CMU), "--local", "--model-root", str(root), "--json"]
    assert main([*argv, "--heatmap", str(heat)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tumorScore"] in (1, 2, 3) and heat.read_bytes().startswith(PNG)
    assert {m["name"] for m in result["models"]} == {"resnet50", "mitosis"}
    untrained = [w for w in result["warnings"] if "untrained" in w]
    assert len(untrained) == 2 and any("resnet50 v1" in w for w in untrained)
    # the plain-text report shows the warning beside the score
    assert main(argv[:-1]) == 0
    assert "warning          model resnet50 v1 is untrained" in capsys.readouterr().out
