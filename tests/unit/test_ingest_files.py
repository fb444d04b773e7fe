"""`prolifscore ingest` with folders: searched recursively for slide files (`--pattern`), every
file checked readable first, and each one that cannot be sent reported by name, while the
readable ones still go out (tests/e2e/test_pipeline_e2e.py runs it against the services)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prolifscore.cli.main import main
from prolifscore.cli.slidefiles import DEFAULT_PATTERNS, find_slides


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A slide folder as users have them: sub-folders, other files, leftovers and accidents."""
    root = tmp_path / "slides"
    (root / "batch2" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    for rel in (
        "TUPAC-TR-001.svs",
        "batch2/TUPAC-TR-002.SVS",
        "batch2/deeper/scan 3 (HE).tiff",
        ".cache/TUPAC-TR-009.svs",
        "README.md",
        "batch2/TUPAC-TR-001.svs",  # the same slide id as the first one
    ):
        (root / rel).write_bytes(b"II*\x00slide")
    (root / "empty.ndpi").write_bytes(b"")
    (root / "gone.svs").symlink_to(root / "deleted.svs")
    os.mkfifo(root / "pipe.svs")
    return root


def test_folders_are_searched_and_every_unsendable_file_is_named(tree: Path) -> None:
    found = find_slides([tree])
    assert [p.relative_to(tree).as_posix() for p in found.files] == [
        "TUPAC-TR-001.svs",
        "batch2/TUPAC-TR-002.SVS",
        "batch2/deeper/scan 3 (HE).tiff",
    ]
    problems = {p.relative_to(tree).as_posix(): why for p, why in found.problems}
    first = tree / "TUPAC-TR-001.svs"
    assert problems == {
        "batch2/TUPAC-TR-001.svs": f"slide id TUPAC-TR-001 is already taken by {first}",
        "empty.ndpi": "empty file",
        "gone.svs": "no such file",
        "pipe.svs": "not a regular file",
    }


def test_pattern_named_files_and_missing_paths(tree: Path, tmp_path: Path) -> None:
    readme = find_slides([tree], ["*.md"])
    assert [p.name for p in readme.files] == ["README.md"] and not readme.problems
    named = find_slides([tree / "README.md", tree / "TUPAC-TR-001.svs", tree / "TUPAC-TR-001.svs"])
    assert [p.name for p in named.files] == ["README.md", "TUPAC-TR-001.svs"]  # as named, once
    (tmp_path / "nothing").mkdir()
    missing = find_slides([tmp_path / "nope.svs", tmp_path / "nothing"])
    assert not missing.files
    assert [why for _, why in missing.problems] == [
        "no such file",
        f"no file matches {', '.join(DEFAULT_PATTERNS)}",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_files_without_read_permission_are_reported(tree: Path) -> None:
    (tree / "TUPAC-TR-001.svs").chmod(0)
    found = find_slides([tree / "TUPAC-TR-001.svs"])
    assert found.problems == [(tree / "TUPAC-TR-001.svs", "Permission denied")]


def test_cli_refuses_bad_options_and_sends_nothing_without_readable_files(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # exit code 2, nothing published (no broker is running here: publishing would fail)
    assert main(["ingest", str(tree), "--run-id", "../../x", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "error: --run-id must match" in capsys.readouterr().err
    assert main(["ingest", str(tree), "--max-tiles", "-1", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "spec.max_tiles must be within" in capsys.readouterr().err
    assert main(["ingest", str(tree / "gone.svs"), str(tree / "pipe.svs")]) == 1
    err = capsys.readouterr().err
    assert f"not sent: {tree / 'gone.svs'}: no such file" in err
    assert "nothing to publish; 2 path(s) not sent" in err
