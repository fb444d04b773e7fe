"""How the scoring service turns tile probabilities into the slide's score: the model's own
rule (its exported cut points), a rule the request asks for, the proliferation index, the
molecular score of a model with that head, and the fused score of both routes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.models.contract import METADATA_FILE
from prolifscore.scoring.scorer import ScoringOptions, fuse, score_slide
from prolifscore.v1 import scoring_pb2 as spb
from tests.slides import CMU, SLIDES

# Every tile says 0.3 / 0.3 / 0.4: argmax 3, mean class (per tile all 3) 3, and the index
# sum_k k p_k = 0.3 + 0.6 + 1.2 = 2.1, which cut points (1.8, 2.3) call score 2.
TILE_PROBS = np.float32([0.3, 0.3, 0.4])
CUTS = [1.8, 2.3]
MOLECULAR = 0.42


class Models:
    """The served models, versions 5 (tumor, with a molecular head) and 8 (mitosis), counting
    Predict calls by output."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def _out(self, output: str, tiles: np.ndarray) -> np.ndarray:
        n, h, w = tiles.shape[:3]
        if output == "probabilities":
            return np.tile(TILE_PROBS, (n, 1))
        if output == "molecular_score":
            return np.full(n, MOLECULAR, np.float32)
        maps = np.zeros((n, -(-h // 8), -(-w // 8)), np.float32)
        maps[:, 5, 5] = 0.95  # one mitosis per tile: the mitotic grade is high
        return maps

    def predict(self, model, tiles, output, timeout=None, label=""):
        self.calls.append((output,))
        return self._out(output, tiles), 5 if model == "resnet50" else 8

    def predict_many(self, model, tiles, outputs, timeout=None, label=""):
        self.calls.append(tuple(outputs))
        return {o: self._out(o, tiles) for o in outputs}, 5

    def close(self) -> None:
        pass


def export_metadata(root: Path, model: str, version: int, meta: dict) -> None:
    path = root / model / str(version) / METADATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta))


@pytest.fixture
def served(tmp_path: Path) -> Path:
    export_metadata(
        tmp_path,
        "resnet50",
        5,
        {
            "trained": True,
            "score_rule": {"default": "cutpoints", "cutpoints": CUTS},
            "molecular_head": {"output": "molecular_score", "trained": True},
        },
    )
    export_metadata(tmp_path, "mitosis", 8, {"trained": True, "threshold": 0.9})
    return tmp_path


def score(root: Path | None, models: Models | None = None, **request) -> spb.SlideScore:
    options = ScoringOptions(metadata_root=str(root) if root else "", predict_batch=8)
    return score_slide(
        spb.ScoreRequest(path=str(CMU), **request),
        slide_roots=(str(SLIDES),),
        options=options,
        models=models or Models(),
    )


def test_the_models_own_cut_points_set_the_score_and_the_result_says_so(served):
    result = score(served)
    assert result.score_rule == spb.SCORE_RULE_CUTPOINTS
    assert result.tumor_score == 2  # index 2.1 between the cut points, not argmax 3
    assert result.proliferation_index == pytest.approx(2.1, abs=1e-5)
    assert list(result.probabilities) == pytest.approx(TILE_PROBS.tolist())


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(spb.SCORE_RULE_ARGMAX, 3), (spb.SCORE_RULE_ROUNDED_MEAN, 3), (spb.SCORE_RULE_CUTPOINTS, 2)],
)
def test_a_request_can_ask_another_rule(served, rule, expected):
    result = score(served, score_rule=rule)
    assert (result.tumor_score, result.score_rule) == (expected, rule)
    assert result.proliferation_index == pytest.approx(2.1, abs=1e-5)  # whatever the rule


def test_the_older_rounded_mean_aggregation_still_asks_the_seeds_rule(served):
    result = score(served, aggregation=spb.AGGREGATION_ROUNDED_MEAN_CLASS)
    assert result.score_rule == spb.SCORE_RULE_ROUNDED_MEAN


def test_without_cut_points_the_score_is_argmax_and_asking_for_them_warns():
    plain = score(None)
    assert (plain.tumor_score, plain.score_rule) == (3, spb.SCORE_RULE_ARGMAX)
    asked = score(None, score_rule=spb.SCORE_RULE_CUTPOINTS)
    assert asked.score_rule == spb.SCORE_RULE_ARGMAX and asked.tumor_score == 3
    assert any("no cut points" in w for w in asked.warnings)
    assert not plain.HasField("molecular_score")  # no metadata: no head known


def test_molecular_score_from_a_trained_head_in_the_same_calls(served):
    models = Models()
    result = score(served, models=models)
    assert result.molecular_score == pytest.approx(MOLECULAR)
    tumor = [c for c in models.calls if "probabilities" in c or c == ("molecular_score",)]
    # the first batch learns the version (and its head) then asks once more for that batch;
    # every later batch gets both outputs from one call
    assert tumor[:2] == [("probabilities",), ("molecular_score",)]
    assert all(c == ("probabilities", "molecular_score") for c in tumor[2:])
    assert len(tumor) >= 3


def test_fused_score_weighs_both_routes_equally(served):
    result = score(served)
    assert result.mitotic_score in (1, 2, 3) and result.fusion
    assert result.fused_score == fuse(result.proliferation_index, result.mitotic_score)
    assert [fuse(1.0, 1), fuse(1.4, 2), fuse(2.1, 1), fuse(2.1, 3), fuse(3.0, 2)] == [1, 2, 2, 3, 3]
    skipped = score(served, skip_mitosis=True)
    assert skipped.fused_score == 0 and not skipped.fusion  # one route: nothing to fuse


def test_an_unknown_rule_is_an_invalid_request(served):
    from prolifscore.scoring.scorer import InvalidRequest

    with pytest.raises(InvalidRequest, match="score_rule"):
        score(served, score_rule=9)
