"""Mitosis detector training: TUPAC detection matching, data set errors, and a reduced-size
check that the detector learns (and that broken labels would be caught)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from prolifscore.core.grading.matching import (
    Counts,
    aggregate,
    evaluate_detections,
    evaluate_regions,
    match_radius_px,
)
from prolifscore.core.models.contract import MITOSIS_OFFSET, MITOSIS_STRIDE
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.inference import detections_from_map
from prolifscore.training.detector.regions import DatasetError, MitosisDataset, read_mitosis_dataset
from prolifscore.training.detector.train import train_mitosis
from tests.slides import CMU, SLIDES

# --------------------------------------------------------------------------------------------
# TUPAC matching.


def test_match_radius_scales_with_resolution() -> None:
    assert match_radius_px(0.25) == 30.0  # the challenge's 30 px at 40x
    assert match_radius_px(0.5) == 15.0


def test_hand_cases() -> None:
    r = 15.0
    assert evaluate_detections([], [], r) == Counts(0, 0, 0)
    assert evaluate_detections([(10, 10)], [], r) == Counts(0, 1, 0)
    assert evaluate_detections([], [(10, 10)], r) == Counts(0, 0, 1)
    assert evaluate_detections([(10, 24)], [(10, 10)], r) == Counts(1, 0, 0)  # 14 px: inside
    assert evaluate_detections([(10, 26)], [(10, 10)], r) == Counts(0, 1, 1)  # 16 px: outside
    # One ground truth is matched once: a second detection near it is a false positive.
    assert evaluate_detections([(10, 10), (12, 12)], [(11, 11)], r) == Counts(1, 1, 0)
    # One detection claims one ground truth: the other is missed.
    assert evaluate_detections([(10, 15)], [(10, 10), (10, 20)], r) == Counts(1, 0, 1)
    # Both pairs are found: A-X (2 px) and B-Y.
    assert evaluate_detections([(0, 2), (0, 14)], [(0, 0), (0, 10)], r) == Counts(2, 0, 0)


def test_confidences_do_not_decide_who_claims() -> None:
    """The challenge ignores confidences when matching; the matching is a maximum one-to-one
    assignment (tests/unit/test_evaluate.py has the tie cases), whatever the order."""
    truth = [(0.0, 0.0)]
    # Two detections near one centroid: one true positive, one false positive, either order.
    for pred in ([(0, 1, 0.2), (0, 10, 0.9)], [(0, 10, 0.9), (0, 1, 0.2)]):
        assert evaluate_detections(pred, truth, 15.0) == Counts(1, 1, 0)
    # Each centroid is claimed once and both are found.
    counts = evaluate_detections([(0, 9, 0.9), (0, 1, 0.5)], [(0, 0), (0, 10)], 15.0)
    assert counts == Counts(2, 0, 0)


def test_counts_and_aggregation() -> None:
    c = aggregate([Counts(3, 1, 0), Counts(1, 0, 2), Counts()])
    assert c == Counts(4, 1, 2)
    assert c.precision == pytest.approx(0.8)
    assert c.recall == pytest.approx(4 / 6)
    assert c.f1 == pytest.approx(8 / 11)
    assert Counts().f1 == 1.0 and Counts(0, 2, 0).f1 == 0.0
    assert evaluate_regions([[(5, 5)], []], [[(5, 6)], [(1, 1)]], 15.0) == Counts(1, 0, 1)
    with pytest.raises(ValueError):
        evaluate_regions([[]], [[], []], 15.0)


def test_detections_from_map_use_the_model_geometry() -> None:
    m = np.zeros((8, 8), np.float32)
    m[3, 5] = 0.9
    m[3, 6] = 0.8  # a neighbour: not a local maximum
    m[7, 0] = 0.4  # below threshold
    dets = detections_from_map(m, 0.5, 16.0)
    assert dets == [
        (
            MITOSIS_STRIDE * 3 + MITOSIS_OFFSET,
            MITOSIS_STRIDE * 5 + MITOSIS_OFFSET,
            pytest.approx(0.9),
        )
    ]
    m[3, 7] = 0.85  # a second maximum 16 px away: merged by NMS (radius 16 px)
    assert len(detections_from_map(m, 0.5, 16.0)) == 1
    assert len(detections_from_map(m, 0.5, 8.0)) == 2


# --------------------------------------------------------------------------------------------
# Data set errors (all before training).


def _write_set(
    root: Path, regions: dict[str, list[tuple[int, int]] | None], size: int = 96
) -> Path:
    rng = np.random.default_rng(0)
    for key, pts in regions.items():
        case, region = key.split("/")
        (root / case).mkdir(parents=True, exist_ok=True)
        image = rng.integers(120, 220, (size, size, 3), dtype=np.uint8)
        tifffile.imwrite(root / case / f"{region}.tif", image, photometric="rgb")
        if pts is not None:
            with (root / case / f"{region}.csv").open("w", newline="") as f:
                csv.writer(f).writerows(pts)
    return root


def test_missing_and_empty_data_sets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_mitosis_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "01").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no region images"):
        read_mitosis_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        train_mitosis(MitosisTrainConfig(), tmp_path / "nope")


def test_unreadable_image(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "d", {"01/01": [(10, 10)]})
    (root / "01" / "02.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DatasetError, match=r"cannot read region image .*02\.tif"):
        read_mitosis_dataset(root)


@pytest.mark.parametrize(
    "line",
    ["10,20,30", "ten,20", "10", "10,nan", "10;20"],
    ids=["3cols", "word", "1col", "nan", "sep"],
)
def test_bad_csv_rows(tmp_path: Path, line: str) -> None:
    root = _write_set(tmp_path / "d", {"01/01": None})
    (root / "01" / "01.csv").write_text(f"5,5\n{line}\n")
    with pytest.raises(DatasetError, match=r"01\.csv:2: expected two numbers"):
        read_mitosis_dataset(root)


def test_csv_semantics(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "d", {"01/01": None, "02/01": [(10, 20)]})
    (root / "01" / "01.csv").write_text("row,col\n\n30,40\n")  # header and blank line tolerated
    data = read_mitosis_dataset(root, mpp=0.5)
    pts = {r.case: r.centroids.tolist() for r in data.regions}
    assert pts == {"01": [[30.0, 40.0]], "02": [[10.0, 20.0]]}
    (root / "02" / "01.csv").write_text("10,500\n")
    with pytest.raises(DatasetError, match="outside the 96x96 image"):
        read_mitosis_dataset(root, mpp=0.5)
    (root / "02" / "01.csv").unlink()
    (root / "02" / "07.csv").write_text("1,1\n")
    with pytest.raises(DatasetError, match="without a region image"):
        read_mitosis_dataset(root, mpp=0.5)


def test_40x_data_is_halved(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "d", {"01/01": [(41, 81)], "02/01": None}, size=200)
    data = read_mitosis_dataset(root)  # no dataset.json: TUPAC aux data, 0.25 um/px
    assert data.mpp == 0.25
    region = next(r for r in data.regions if r.case == "01")
    assert region.image.shape == (100, 100, 3)
    assert region.centroids.tolist() == [[20.25, 40.25]]  # pixel centres: (x + 0.5) / 2 - 0.5
    (root / "dataset.json").write_text(json.dumps({"mpp": 0.5}))
    assert read_mitosis_dataset(root).regions[0].image.shape == (200, 200, 3)


def test_split_needs_two_cases_and_training_mitoses(tmp_path: Path) -> None:
    one = _write_set(tmp_path / "one", {"01/01": [(40, 40)], "01/02": None})
    with pytest.raises(DatasetError, match="at least 2"):
        train_mitosis(MitosisTrainConfig(data_mpp=0.5), one)
    none = _write_set(tmp_path / "none", {"01/01": None, "02/01": None, "03/01": None})
    with pytest.raises(DatasetError, match="no mitosis"):
        train_mitosis(MitosisTrainConfig(data_mpp=0.5), none)
    data = read_mitosis_dataset(none, mpp=0.5)
    train, held = data.split(0.2, seed=1)
    assert {r.case for r in train}.isdisjoint({r.case for r in held})
    assert len(held) == 1 and data.split(0.2, seed=1)[1][0].case == held[0].case


# --------------------------------------------------------------------------------------------
# Learning at reduced size.

TINY = MitosisTrainConfig(
    epochs=5,
    learning_rate=4e-3,
    batch_size=32,
    width=8,
    positive_copies=6,
    negatives_per_region=16,
    dark_negative_share=0.75,
    hard_negative_rounds=1,
    hard_negative_epochs=2,
    hard_negatives_per_region=8,
    hard_negative_copies=1,
    positive_share=0.3,
    val_fraction=0.34,
    eval_every_epoch=False,
    seed=0,
)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prolifscore.synthetic.mitosis_set import make_mitosis_dataset

    return make_mitosis_dataset(
        tmp_path_factory.mktemp("tiny") / "data",
        cases=6,
        regions_per_case=3,
        region_size=320,
        seed=11,
        empty_fraction=0.1,
        mitoses_per_region=(3, 6),
        source_dir=SLIDES,
    )


def _broken_training_labels(data: MitosisDataset, config: MitosisTrainConfig) -> MitosisDataset:
    """The same images, with the training cases' centroids moved to random places; held-out
    labels stay true. What a row/col swap or an off-by-a-patch cut would do to training."""
    train, _ = data.split(config.val_fraction, config.seed)
    rng = np.random.default_rng(0)
    broken = copy.copy(data)
    broken.regions = [
        dataclasses.replace(
            r,
            centroids=rng.uniform(20, np.array(r.image.shape[:2]) - 20, r.centroids.shape),
        )
        if any(r is t for t in train)
        else r
        for r in data.regions
    ]
    return broken


@pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")
@pytest.mark.slow
def test_detector_learns_and_exports(tiny_set: Path, tmp_path: Path) -> None:
    """Held-out F1 clearly above (a) the darkness baseline (local maxima of smoothed darkness,
    threshold tuned on the training cases: what "dark blob = mitosis" achieves) and (b) the
    same training with broken training coordinates, scored against the true held-out labels."""
    import tensorflow as tf

    from prolifscore.core.models.export import read_metadata
    from prolifscore.training.detector.inference import detection_maps

    data = read_mitosis_dataset(tiny_set)
    result = train_mitosis(TINY, tiny_set, tmp_path / "models", dataset=data)
    f1, baseline = result.metrics["f1"], result.baseline["f1"]
    assert result.metrics["mitoses"] >= 15  # enough held-out mitoses for F1 to mean something
    # Measured here: F1 0.56 (22 held-out mitoses), baseline 0.09, broken labels 0.04.
    assert f1 >= 0.35 and f1 >= baseline + 0.2, (result.metrics, result.baseline)
    assert result.split["train"] and result.split["held_out"]
    assert len(result.history) == TINY.epochs + TINY.hard_negative_epochs
    assert result.history[-1]["hard_negatives"] > 0

    control = dataclasses.replace(TINY, epochs=2, hard_negative_rounds=0)  # cheap: it cannot learn
    broken = train_mitosis(control, tiny_set, dataset=_broken_training_labels(data, TINY))
    assert broken.split == result.split
    assert broken.metrics["f1"] <= f1 - 0.25, (broken.metrics, result.metrics)

    # The export is the detector scoring will load: the same map through the uint8 signature.
    assert result.export_dir is not None
    meta = read_metadata(result.export_dir)
    assert meta["trained"] is True and meta["kind"] == "mitosis"
    assert meta["threshold"] == result.threshold
    assert meta["data"]["fingerprint"] == result.fingerprint == data.fingerprint
    assert meta["metrics"]["held_out"]["f1"] == f1
    serve = tf.saved_model.load(str(result.export_dir)).signatures["serving_default"]
    region = data.regions[0].image
    out = serve(tiles=tf.constant(region[None]))["mitosis_map"].numpy()
    assert out.shape == (1, 40, 40)
    np.testing.assert_allclose(out[0], detection_maps(result.detector, [region])[0], atol=1e-4)
