"""Benchmarks of the preprocessing pipeline and scoring (`make bench` runs `python -m bench.run`).

Work files (the large synthetic slide, shards, models) go to bench/work/, which git ignores.

The shared real slides are located here, once, for the benchmarks and the tests alike: the
tests import these paths from bench (they already depend on it), never the other way round,
since `make bench` must run without the test suite.
"""

import os
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results.json"  # the committed figures (`make bench-update`)
OUTPUT = BENCH_DIR.parent / "build" / "bench" / "results.json"  # a `make bench` run's
# ../shared/data/slides beside the checkout, or PROLIF_TEST_SLIDES.
SLIDES = Path(
    os.environ.get("PROLIF_TEST_SLIDES", BENCH_DIR.parents[1] / "shared" / "data" / "slides")
)
CMU = SLIDES / "cmu-1-small-region.svs"
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
