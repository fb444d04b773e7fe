"""Benchmarks of the preprocessing pipeline (`make bench` runs `python -m bench.run`).

Work files (the large synthetic slide, shards) go to bench/work/, which git ignores.
"""

import os
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / "work"
SLIDES_DIR = Path(
    os.environ.get("PROLIF_TEST_SLIDES", BENCH_DIR.parents[1] / "shared" / "data" / "slides")
)
CMU = SLIDES_DIR / "cmu-1-small-region.svs"
TCGA = SLIDES_DIR / "tcga-cr-7395-01a-01-ts1.svs"
