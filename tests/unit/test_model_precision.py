"""bf16 serving (PROLIF_MODEL_PRECISION=bf16): the model server runs both models in bfloat16 on
CPUs that have it, and a slide scored that way keeps its grades, with tile probabilities
within 0.02 of fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.runtime.settings import PreprocessSettings
from prolifscore.localstack.stack import ServiceProcess
from prolifscore.v1 import scoring_pb2 as spb
from tests.slides import CMU

pytest.importorskip("tensorflow")

from prolifscore.core.models.precision import apply_precision, cpu_has_bf16
from prolifscore.scoring.model_client import InProcessModels, PredictionClient
from prolifscore.scoring.scorer import ScoringOptions, score_slide


def _score(models) -> spb.SlideScore:
    return score_slide(
        spb.ScoreRequest(path=str(CMU), include_tiles=True),
        slide_roots=(str(CMU.parent),),
        options=ScoringOptions(preprocess=PreprocessSettings(), pipelined=False),
        models=models,
    )


@pytest.mark.slow  # starts a model server process
def test_bf16_model_server_scores_like_fp32(exported_root: Path, tmp_path: Path) -> None:
    server = ServiceProcess(
        "prolifscore.modelserver.server",
        {"PROLIF_MODEL_ROOT": str(exported_root), "PROLIF_MODEL_PRECISION": "bf16"},
        tmp_path / "modelserver.log",
        port_env="PROLIF_MODEL_SERVER_PORT",
    ).launch()
    try:
        fp32 = InProcessModels(exported_root)  # this process stays fp32
        try:
            reference = _score(fp32)
        finally:
            fp32.close()
        server.wait_serving(120)
        client = PredictionClient(server.grpc_address)
        try:
            bf16 = _score(client)
        finally:
            client.close()
    finally:
        server.stop()
    if cpu_has_bf16():
        assert '"precision": "bf16"' in (tmp_path / "modelserver.log").read_text()
    assert bf16.tiles_scored == reference.tiles_scored > 0
    grades = (reference.tumor_score, reference.mitotic_score)
    assert (bf16.tumor_score, bf16.mitotic_score) == grades
    a = np.array([t.probabilities for t in reference.tiles])
    b = np.array([t.probabilities for t in bf16.tiles])
    c, d = [t.mitosis_max for t in reference.tiles], [t.mitosis_max for t in bf16.tiles]
    diff = max(np.abs(a - b).max(), np.abs(np.subtract(c, d)).max())
    assert diff <= 0.02
    if cpu_has_bf16():  # bf16 really ran: not bit-identical to fp32
        assert diff > 0


def test_precision_is_checked_and_bf16_needs_the_cpu(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp32, bf16"):
        apply_precision("fp16")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert not cpu_has_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_bf16(cpuinfo)
    assert apply_precision("fp32") is False
