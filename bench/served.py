"""`make bench-training`'s held-out figures as users get them: the trained exports in a model
root, the local model server and the scoring service each in its own process (as `prolifscore
up` runs them), and one `ScoreSlide` per held-out slide. The scorer applies what the exports
carry (the tumor model's cut points, the detector's threshold, the molecular head), because the
service reads the model root's metadata (`PROLIF_MODEL_METADATA_ROOT`) as deployed.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.scoring import cpu_seconds, model_server, scoring_process


def truth_table(slide_dir: Path) -> dict[str, tuple[int, float]]:
    """slide_id -> (tumor_score, molecular_score) from the synthetic set's ground_truth.csv."""
    rows = csv.DictReader((slide_dir / "ground_truth.csv").read_text().splitlines())
    return {r["slide_id"]: (int(r["tumor_score"]), float(r["molecular_score"])) for r in rows}


def score_through_service(
    slide_dir: Path,
    model_root: Path,
    slide_ids: Sequence[str],
    work: Path,
    precision: str = "fp32",
) -> dict[str, Any]:
    """ScoreSlide for every slide of `slide_ids` through the two service processes, the model
    server at `precision` (PROLIF_MODEL_PRECISION); the figures of `bench/validate.json` from
    the answers, with wall and CPU seconds (this process plus both service processes)."""
    answers, timing = served_answers(slide_dir, model_root, slide_ids, work, precision)
    figures = served_figures(truth_table(slide_dir), answers)
    figures["served_timing"] = timing
    return figures


def served_answers(
    slide_dir: Path,
    model_root: Path,
    slide_ids: Sequence[str],
    work: Path,
    precision: str = "fp32",
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """The service's answer for every slide of `slide_ids` (in that order) and the timing:
    wall, ready and CPU seconds, and the precision the model server says it runs (its log's
    "model server ready" line: bf16 falls back to fp32 on a CPU without bf16)."""
    import grpc

    from prolifscore.v1 import scoring_pb2 as spb
    from prolifscore.v1 import scoring_pb2_grpc

    work.mkdir(parents=True, exist_ok=True)
    started, cpu0 = time.perf_counter(), time.process_time()
    answers = []
    server_log = work / "modelserver.log"
    with (
        model_server(model_root, server_log, {"PROLIF_MODEL_PRECISION": precision}) as server,
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
    timing = {
        "wall_s": round(time.perf_counter() - started, 1),
        "ready_s": round(ready_s, 1),
        "cpu_s": round(cpu, 1),
        "precision_asked": precision,
        "precision_in_effect": served_precision(server_log),
    }
    return answers, timing


def served_precision(log_path: Path) -> str | None:
    """The precision of the model server's "model server ready" log line (None: not found)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"model server ready"' in line:
            try:
                return json.loads(line).get("precision")
            except ValueError:
                return None
    return None


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


def precision_agreement(fp32: list[tuple[str, Any]], bf16: list[tuple[str, Any]]) -> dict[str, Any]:
    """How far the answers with the model server in bf16 are from the fp32 ones,
    slide by slide: the share of slides with the same tumor_score AND mitotic_score, the slides
    that differ (their [tumor_score, mitotic_score] both ways), the largest |difference| of the
    proliferation index, the molecular score and the class probabilities, and both mitosis
    counts of every slide."""
    if [s for s, _ in fp32] != [s for s, _ in bf16]:
        raise ValueError("the two answer lists must cover the same slides in the same order")
    pairs = [(s, a, b) for (s, a), (_, b) in zip(fp32, bf16, strict=True)]
    differ = [
        {
            "slide_id": s,
            "fp32": [a.tumor_score, a.mitotic_score],
            "bf16": [b.tumor_score, b.mitotic_score],
        }
        for s, a, b in pairs
        if (a.tumor_score, a.mitotic_score) != (b.tumor_score, b.mitotic_score)
    ]
    molecular = [
        abs(a.molecular_score - b.molecular_score)
        for _, a, b in pairs
        if a.HasField("molecular_score") and b.HasField("molecular_score")
    ]
    one_sided = [
        s for s, a, b in pairs if a.HasField("molecular_score") != b.HasField("molecular_score")
    ]
    probabilities = [
        abs(p - q)
        for _, a, b in pairs
        for p, q in zip(a.probabilities, b.probabilities, strict=True)
    ]
    return {
        "same_scores_share": round(1 - len(differ) / len(pairs), 4) if pairs else None,
        "slides_with_other_scores": differ,
        "max_proliferation_index_diff": _largest(
            abs(a.proliferation_index - b.proliferation_index) for _, a, b in pairs
        ),
        "max_molecular_score_diff": _largest(molecular),
        "slides_with_molecular_on_one_side_only": one_sided,
        "max_probability_diff": _largest(probabilities),
        "max_mitosis_count_diff": max(
            (abs(a.mitosis_count - b.mitosis_count) for _, a, b in pairs), default=None
        ),
        "mitosis_counts_fp32_bf16": [[s, a.mitosis_count, b.mitosis_count] for s, a, b in pairs],
    }


def _largest(diffs: Iterable[float]) -> float | None:
    """The largest difference to 6 decimals: float32 outputs agree to ~1e-7, bf16 does not."""
    values = list(diffs)
    return round(max(values), 6) if values else None
