"""The benchmark table of the README, generated from bench/results.json.

`python -m bench.table` prints it; `python -m bench.table --write-readme` replaces the block
between the README's `bench-table` markers with it (`make bench-update` does that after its
run). tests/unit/test_readme.py checks that the README's block matches bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import RESULTS

# The targets the headline figures are held to (bench/run.py measures them).
TARGETS = {
    "preprocess_vs_raw_decode_ratio": ">= 0.8",
    "fast_vs_seed_jaccard": ">= 0.8",
    "ray_2_vs_1_worker_speedup": ">= 1.7",
    "filter_worker_peak_rss_mb": "< 2048",
    "scoring_vs_direct_model_ratio": "<= 1.15",
    "viewer_vs_decode_ratio": ">= 0.7",
    "scoring_bf16_vs_fp32_speedup": ">= 1.6",
    "scoring_bf16_agreement": "1.0",
    "scoring_bf16_max_prob_diff": "<= 0.02",
    "scoring_large_peak_rss_gb": "< 3",
    "scoring_large_vs_direct_model_ratio": "<= 1.1",
    "scoring_whole_slide_peak_rss_gb": "< 3",
    "scoring_whole_slide_vs_direct_model_ratio": "<= 1.1",
    "scoring_concurrent_vs_sequential_speedup": "> 1",
}
README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per numeric metric of `results` (keys starting with `_` are notes, skipped):
    name, value, and its target in TARGETS, if any."""
    lines = ["| Metric | Value | Target |", "|---|---:|---|"]
    for key, value in results.items():
        if key.startswith("_") or not _is_number(value):
            continue
        lines.append(f"| `{key}` | {value} | {TARGETS.get(key, '')} |")
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    """The text between the bench-table markers of the README (ValueError without them)."""
    start = text.find(START)
    end = text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README lacks the markers {START} ... {END}")
    return text[start + len(START) : end]


def with_table(text: str, table: str) -> str:
    """`text` (the README) with the block between the markers replaced by `table`."""
    block = readme_block(text)
    start = text.index(START) + len(START)
    return text[:start] + "\n" + table + text[start + len(block) :]


def update_readme(results: dict[str, Any]) -> None:
    """Replace the README's table with that of `results` (ValueError without the markers)."""
    text = README.read_text()
    new = with_table(text, markdown_table(results))
    if new != text:
        README.write_text(new)
        print(f"updated the benchmark table in {README}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--write-readme", action="store_true", help="replace the README's benchmark table"
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if not args.write_readme:
        print(markdown_table(results), end="")
        return 0
    try:
        update_readme(results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
