"""`make bench-training`'s held-out figures as users get them: the trained exports in a model
root, the local model server and the scoring service each in its own process (as `prolifscore
up` runs them), and one `ScoreSlide` per held-out slide. The scorer applies what the exports
carry (the tumor model's cut points, the detector's threshold, the molecular head), because the
service reads the model root's metadata (`PROLIF_MODEL_METADATA_ROOT`) as deployed.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.scoring import cpu_seconds, model_server, scoring_process


def truth_table(slide_dir: Path) -> dict[str, tuple[int, float]]:
    """slide_id -> (tumor_score, molecular_score) from the synthetic set's ground_truth.csv."""
    rows = csv.DictReader((slide_dir / "ground_truth.csv").read_text().splitlines())
    return {r["slide_id"]: (int(r["tumor_score"]), float(r["molecular_score"])) for r in rows}


def score_through_service(
    slide_dir: Path, model_root: Path, slide_ids: Sequence[str], work: Path
) -> dict[str, Any]:
    """ScoreSlide for every slide of `slide_ids` through the two service processes; the
    figures of `bench/validate.json` from the answers, with wall and CPU seconds (this process
    plus both service processes)."""
    import grpc

    from prolifscore.v1 import scoring_pb2 as spb
    from prolifscore.v1 import scoring_pb2_grpc

    work.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), time.process_time()
    answers = []
    with (
        model_server(model_root, work / "modelserver.log") as server,
        scoring_process(
            server.grpc_address,
            [slide_dir],
            work / "results",
            work / "scoring.log",
            PROLIF_MODEL_METADATA_ROOT=str(model_root),
        ) as scoring,
    ):
        server.wait_serving(300)
        scoring.wait_serving(300)
        ready_s = time.perf_counter() - started
        with grpc.insecure_channel(scoring.grpc_address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            for slide_id in slide_ids:
                request = spb.ScoreRequest(path=str(slide_dir / f"{slide_id}.tiff"))
                answers.append((slide_id, stub.ScoreSlide(request, timeout=600)))
        # Both service processes' CPU seconds, read while they still run.
        cpu = cpu_seconds(server.pid) + cpu_seconds(scoring.pid) - 2 * time.process_time()
    cpu += time.process_time() - cpu0
    figures = served_figures(truth_table(slide_dir), answers)
    figures["served_timing"] = {
        "wall_s": round(time.perf_counter() - started, 1),
        "ready_s": round(ready_s, 1),
        "cpu_s": round(cpu, 1),
    }
    return figures


def served_figures(
    truth: dict[str, tuple[int, float]], answers: list[tuple[str, Any]]
) -> dict[str, Any]:
    """Kappas (tumor model under the export's rule, mitosis route) and the molecular Spearman
    from the service's answers; every answer's figures kept."""
    from prolifscore.core.grading.evaluation import quadratic_weighted_kappa, spearman

    y = [truth[s][0] for s, _ in answers]
    tumor = [a.tumor_score for _, a in answers]
    route = [a.mitotic_score for _, a in answers]
    with_molecular = [
        (truth[s][1], a.molecular_score) for s, a in answers if a.HasField("molecular_score")
    ]
    rows = [
        {
            "slide_id": s,
            "truth": truth[s][0],
            "truth_molecular": truth[s][1],
            "tumor_score": a.tumor_score,
            "proliferation_index": round(a.proliferation_index, 4),
            "molecular_score": round(a.molecular_score, 4)
            if a.HasField("molecular_score")
            else None,
            "mitotic_score": a.mitotic_score,
            "mitosis_count": a.mitosis_count,
            "tiles_scored": a.tiles_scored,
        }
        for s, a in answers
    ]
    rules = sorted({int(a.score_rule) for _, a in answers})
    return {
        "tumor_model_kappa": quadratic_weighted_kappa(y, tumor),
        "mitosis_route_kappa": quadratic_weighted_kappa(y, route),
        "molecular_spearman": (
            spearman([m for m, _ in with_molecular], [p for _, p in with_molecular])
            if len(with_molecular) == len(answers)
            else None
        ),
        "proliferation_index_spearman": spearman(y, [a.proliferation_index for _, a in answers]),
        "served_slides": len(answers),
        "served_score_rules": rules,
        "served_mitosis_threshold": round(answers[0][1].mitosis_threshold, 4) if answers else None,
        "served_rows": rows,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
