"""Where the benchmark's figures go: a run writes a results file of its own; only an update
(`make bench-update`) writes the committed figures, bench/results.json and the README's table."""

from __future__ import annotations

import json

import bench.run as bench_run
import bench.table as bench_table
from bench.run import save
from bench.table import END, START, markdown_table, readme_block, update_readme

FULL = {"a": 1.0, "b": 2.0, "bench_seconds": 9.0, "_note": "full", "_note_sections": "x"}
PARTIAL = {"b": 3.0, "bench_seconds": 1.0, "_note": "part", "_note_sections": "scoring 1 s"}


def test_a_run_writes_its_own_file_and_leaves_the_committed_figures(tmp_path, monkeypatch):
    committed = tmp_path / "results.json"
    committed.write_text(json.dumps(FULL))
    monkeypatch.setattr(bench_run, "RESULTS", committed)
    out = tmp_path / "build" / "bench" / "results.json"
    # A partial run without an output file yet: merged into the committed figures.
    written = save(PARTIAL, out, partial=True)
    assert json.loads(out.read_text()) == written
    assert (written["a"], written["b"], written["bench_seconds"]) == (1.0, 3.0, 9.0)
    # The next partial run merges into the previous output.
    later = {"c": 4.0, "bench_seconds": 2.0, "_note": "later", "_note_sections": "ray 2 s"}
    again = save(later, out, partial=True)
    assert (again["b"], again["c"]) == (3.0, 4.0) and "ray 2 s" in again["_note_partial"]
    # A full run replaces the output as a whole.
    assert save(FULL, out) == FULL == json.loads(out.read_text())
    assert json.loads(committed.read_text()) == FULL


def test_update_readme_replaces_only_the_table(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{START}\nold\n{END}\n\nafter\n")
    monkeypatch.setattr(bench_table, "README", readme)
    update_readme(FULL)
    text = readme.read_text()
    assert readme_block(text).strip() == markdown_table(FULL).strip()
    assert text.startswith(f"# Title\n\n{START}\n") and text.endswith(f"{END}\n\nafter\n")
