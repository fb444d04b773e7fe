"""The input rules (core/runtime/validation.py) against a list of attack strings: traversal,
encoded traversal, absolute paths, NUL and other control characters, Unicode look-alikes and
invisible characters, 100 KB and 5 MB values. Every rejection is short and names the field; ids
that real users send (TUPAC, TCGA, file names) pass or are made valid."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from prolifscore.core.runtime.validation import (
    ID_PATTERN,
    MAX_MESSAGE_BYTES,
    MAX_PATH_BYTES,
    InvalidInput,
    OutsideRoots,
    carried_id,
    carried_path,
    check_id,
    check_path,
    clip,
    confine,
    id_from_name,
    validate_ingest,
    validate_score_request,
    validate_spec,
    validate_tile_task,
    validate_train_request,
)
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import training_pb2 as tpb

FIVE_MB = "r" * (5 * 1024 * 1024)
HUNDRED_KB = "/slides/" + "a" * (100 * 1024) + ".svs"
MODELS = ("resnet50", "mitosis")

# Identifiers people and tools really send.
GOOD_IDS = [
    "TUPAC-TR-001",
    "TUPAC-TE-321",
    "TCGA-A2-A0CM-01Z-00-DX1.AC4901DE-4B6D-4185-BB9F-156033839828",
    "cmu-1-small-region",
    "tcga-cr-7395-01a-01-ts1",
    "prolif.score.requests-0-7",  # what a request without id is named
    "resnet50-1a2b3c4d",  # `prolifscore train`'s run ids
    "0f8e2c4b9a1d",  # `prolifscore ingest`'s run ids
    "synthetic-007",
    "a",
    "x" * 128,
]
# (attack, what it tries)
BAD_IDS = [
    ("../etc/passwd", "traversal"),
    ("..", "parent"),
    (".", "current folder"),
    ("../../../../tmp/pwned", "deep traversal"),
    ("a/b", "sub-folder"),
    ("/etc/cron.d/x", "absolute path"),
    ("C:\\Windows\\x", "Windows path"),
    ("..%2f..%2fetc", "percent-encoded traversal"),
    ("%2e%2e", "percent-encoded parent"),
    ("..\\..\\x", "backslash traversal"),
    ("a\x00b", "NUL byte"),
    ("a\nb", "newline (log injection)"),
    ("TUPAC\u2010TR\u2010001", "Unicode hyphens that look like '-'"),
    ("\uff0e\uff0e\uff0f", "full-width '../'"),
    ("\u0422UPAC-TR-001", "Cyrillic T look-alike"),
    ("a\u202eb", "right-to-left override"),
    ("a\u200bb", "zero-width space"),
    ("-rf", "reads as an option"),
    (".hidden", "hidden file"),
    (" x", "leading space"),
    ("x" * 129, "one character too long"),
    (FIVE_MB, "5 MB"),
]
BAD_PATHS = [
    ("/slides/a\x00.svs", "U+0000"),
    ("/slides/a\n.svs", "U+000A"),
    ("/slides/a\x1b[31m.svs", "U+001B"),
    ("/slides/\u202egvs.exe", "U+202E"),
    ("/slides/a\u200d.svs", "U+200D"),
    ("/slides/a\ufeff.svs", "U+FEFF"),
    ("/slides/\ud800.svs", "U+D800"),  # lone surrogate (JSON "\ud800")
    ("/slides/a\u2028.svs", "U+2028"),
    (HUNDRED_KB, f"longer than {MAX_PATH_BYTES} bytes"),
    (FIVE_MB, f"longer than {MAX_PATH_BYTES} bytes"),
]


def rejection(check, *args) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        check(*args)
    return err.value


@pytest.mark.parametrize("value", GOOD_IDS)
def test_ids_real_users_send_pass(value):
    assert check_id("slide_id", value) == value and carried_id(value) == value


@pytest.mark.parametrize("value,what", BAD_IDS, ids=[w for _, w in BAD_IDS])
def test_bad_ids_are_refused_with_a_short_message_naming_the_field(value, what):
    err = rejection(check_id, "request_id", value)
    assert err.field == "request_id" and str(err).startswith("request_id ")
    assert len(str(err).encode()) < 200, "the message must not echo the value"
    assert ID_PATTERN in str(err) or "longer than 128 characters" in str(err)
    assert carried_id(value) == ""


@pytest.mark.parametrize("value,problem", BAD_PATHS, ids=[p for _, p in BAD_PATHS])
def test_paths_with_control_characters_or_oversize_are_refused(value, problem):
    err = rejection(check_path, "path", value)
    assert problem in str(err) and len(str(err)) < 120
    assert carried_path(value) == ""


def test_normal_paths_pass_including_non_ascii_names():
    for path in ("/data/slides/TUPAC-TR-001.svs", "Färbung/schnitt 1 (HE).tif", "a" * 4000):
        assert check_path("path", path) == path
    assert rejection(check_path, "path", "").args[0] == "path is required"
    assert check_path("weights", "", required=False) == ""


@pytest.mark.parametrize(
    "name,expected",
    [
        ("TUPAC-TR-001", "TUPAC-TR-001"),
        ("slide 1 (HE)", "slide_1_HE_"),
        ("Färbung", "Farbung"),
        ("..hidden", "hidden"),
        ("日本語", "slide"),
        ("", "slide"),
        ("x" * 300, "x" * 128),
    ],
)
def test_file_names_become_valid_ids(name, expected):
    assert id_from_name(name) == expected
    check_id("slide_id", id_from_name(name))


@pytest.mark.parametrize("value,_what", BAD_IDS[:-1], ids=[w for _, w in BAD_IDS[:-1]])
def test_every_attack_string_made_an_id_is_valid(value, _what):
    check_id("slide_id", id_from_name(value))


def test_confine_keeps_paths_inside_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sets").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = (root,)
    assert confine("dataset", "sets", roots, "R") == root / "sets"  # relative: first root
    assert confine("dataset", str(root / "sets" / "new"), roots, "R") == root / "sets" / "new"
    # percent-encoding is not decoded: a literal folder name inside the root
    assert confine("dataset", "%2e%2e/%2e%2e", roots, "R") == root / "%2e%2e" / "%2e%2e"
    for attack in ("../outside", "sets/../../outside", str(outside), "/etc", "escape/x"):
        err = rejection(confine, "dataset", attack, roots, "R")
        assert isinstance(err, OutsideRoots) and "outside the configured roots (R)" in str(err)
    assert "no roots are configured" in str(rejection(confine, "weights", "x", (), "W"))
    assert "U+0000" in str(rejection(confine, "dataset", "sets\x00", roots, "R"))


def test_clip_bounds_messages_in_utf8_bytes():
    assert clip("short") == "short"
    for text in (FIVE_MB, "é" * 100_000 + " is outside the roots"):
        clipped = clip(text)
        assert len(clipped.encode()) <= MAX_MESSAGE_BYTES and "bytes cut ...]" in clipped
        assert clipped[:10] == text[:10] and clipped[-10:] == text[-10:]


# -- messages -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"tile_size": 8}, "spec.tile_size"),
        ({"tile_size": 100_000}, "spec.tile_size"),
        ({"tissue_threshold": math.nan}, "spec.tissue_threshold"),
        ({"tissue_threshold": 1.5}, "spec.tissue_threshold"),
        ({"target_mpp": math.inf}, "spec.target_mpp"),
        ({"target_mpp": 0.0}, "spec.target_mpp"),
        ({"target_magnification": -20}, "spec.target_magnification"),
        ({"max_tiles": -1}, "spec.max_tiles"),
        ({"max_tiles": 2**31 - 1}, "spec.max_tiles"),
        ({"tile_size": 256, "overlap": 256}, "spec.overlap"),
        ({"overlap": -3}, "spec.overlap"),
        ({"tissue_mode": 9}, "spec.tissue_mode"),
        ({"stain_normalization": -1}, "spec.stain_normalization"),
    ],
)
def test_spec_values_out_of_range_are_refused(fields, field):
    assert rejection(validate_spec, pb.TilingSpec(**fields)).field == field


def test_spec_values_in_range_pass():
    validate_spec(pb.TilingSpec())
    validate_spec(
        pb.TilingSpec(
            target_mpp=0.25,
            tile_size=32,
            overlap=16,
            tissue_threshold=0.5,
            max_tiles=2000,
            tissue_mode=pb.TISSUE_MODE_SEED,
            stain_normalization=pb.STAIN_NORMALIZATION_MACENKO,
        )
    )


def ingest(**fields) -> pb.SlideIngest:
    return pb.SlideIngest(**{"slide_id": "TUPAC-TR-001", "path": "TUPAC-TR-001.svs", **fields})


@pytest.mark.parametrize(
    "message,field",
    [
        (ingest(run_id=FIVE_MB), "run_id"),
        (ingest(slide_id="../../x"), "slide_id"),
        (ingest(slide_id=""), "slide_id"),
        (ingest(path="a\x00b"), "path"),
        (ingest(path=HUNDRED_KB), "path"),
        (ingest(labels=pb.Labels(tumor_score=4)), "labels.tumor_score"),
        (ingest(labels=pb.Labels(molecular_score=math.nan)), "labels.molecular_score"),
        (ingest(split=7), "split"),
        (ingest(spec=pb.TilingSpec(tile_size=1)), "spec.tile_size"),
        (ingest(rois=[pb.Polygon(rings=[pb.Ring(xy=[0.0] * 60_000)])]), "rois"),  # 30000 vertices
        (ingest(rois=[pb.Polygon(rings=[pb.Ring(xy=[0, 0, math.inf, 0, 5, 5])])]), "rois"),
    ],
)
def test_ingest_messages(message, field):
    err = rejection(validate_ingest, message)
    assert err.field == field and len(str(err)) < 200


def test_valid_messages_pass():
    validate_ingest(ingest(run_id="demo", labels=pb.Labels(tumor_score=2, molecular_score=0.4)))
    validate_score_request(spb.ScoreRequest(path="x.svs"))
    validate_score_request(spb.ScoreRequest(request_id="req-001", slide_id="s", path="x.svs"))
    validate_train_request(tpb.TrainRequest(model="mitosis", dataset="d", profile="quick"), MODELS)
    task = pb.TileTask(slide_id="s", path="p", batch_count=2, batch_index=1)
    task.spec.spec_hash, task.spec.tile_size, task.spec.read_size = "0123abcd", 256, 512
    validate_tile_task(task)


@pytest.mark.parametrize(
    "request_,field",
    [
        (spb.ScoreRequest(request_id="../../etc/x", path="x"), "request_id"),
        (spb.ScoreRequest(request_id=FIVE_MB, path="x"), "request_id"),
        (spb.ScoreRequest(slide_id="a/b", path="x"), "slide_id"),
        (spb.ScoreRequest(), "path"),
        (spb.ScoreRequest(path="x\x00"), "path"),
        (spb.ScoreRequest(path=HUNDRED_KB), "path"),
        (spb.ScoreRequest(path="x", aggregation=7), "aggregation"),
        (spb.ScoreRequest(path="x", score_rule=42), "score_rule"),
        (
            spb.ScoreRequest(path="x", spec=pb.TilingSpec(tissue_threshold=2)),
            "spec.tissue_threshold",
        ),
    ],
)
def test_score_requests(request_, field):
    assert rejection(validate_score_request, request_).field == field


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"request_id": "../runs-escape"}, "request_id"),
        ({"model": "../resnet50"}, "model"),
        ({"model": "vgg16"}, "model"),
        ({"model": FIVE_MB}, "model"),
        ({"dataset": ""}, "dataset"),
        ({"dataset": "d\x00"}, "dataset"),
        ({"weights": "w\n.h5"}, "weights"),
        ({"workers": 100_000}, "workers"),
        ({"epochs": -1}, "epochs"),
        ({"input_size": 8}, "input_size"),
        ({"input_size": 100_000}, "input_size"),
        ({"profile": FIVE_MB}, "profile"),
    ],
)
def test_train_requests(fields, field):
    request = tpb.TrainRequest(**{"model": "resnet50", "dataset": "tiles", **fields})
    err = rejection(validate_train_request, request, MODELS)
    assert err.field == field and len(str(err)) < 200


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda t: setattr(t.spec, "spec_hash", "../../../etc"), "spec.spec_hash"),
        (lambda t: setattr(t.spec, "spec_hash", ""), "spec.spec_hash"),
        (lambda t: setattr(t, "slide_id", "../x"), "slide_id"),
        (lambda t: setattr(t, "batch_index", 5), "batch_index"),
        (lambda t: setattr(t, "batch_count", 0), "batch_count"),
        (lambda t: t.tiles.extend(pb.Tile() for _ in range(70_000)), "tiles"),
        (lambda t: setattr(t.spec, "read_size", 10**9), "spec.read_size"),
    ],
)
def test_tile_tasks(change, field):
    task = pb.TileTask(slide_id="s", path="p", batch_count=2, batch_index=1)
    task.spec.spec_hash, task.spec.tile_size, task.spec.read_size = "0123abcd", 256, 512
    change(task)
    assert rejection(validate_tile_task, task).field == field


@pytest.mark.skipif(os.name != "posix", reason="POSIX symlinks")
def test_confined_dataset_resolves_symlinks_at_check_time(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    assert "outside" in str(rejection(confine, "dataset", "link", (root,), "PROLIF_DATA_ROOTS"))
