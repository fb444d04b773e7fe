"""Benchmarks of the preprocessing pipeline and scoring (`make bench` runs `python -m bench.run`).

Work files (the large synthetic slide, shards, models) go to bench/work/, which git ignores.

The shared real slides are located once (`prolifscore.synthetic.sources.default_source_dir`,
which the demo uses too); the tests import these paths from bench, never the other way round,
since `make bench` must run without the test suite.
"""

from pathlib import Path

from prolifscore.synthetic.sources import default_source_dir

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results.json"  # the committed figures (`make bench-update`)
OUTPUT = BENCH_DIR.parent / "build" / "bench" / "results.json"  # a `make bench` run's
SLIDES = default_source_dir()  # ../shared/data/slides beside the checkout, or PROLIF_TEST_SLIDES
CMU = SLIDES / "cmu-1-small-region.svs"
TCGA = SLIDES / "tcga-cr-7395-01a-01-ts1.svs"
