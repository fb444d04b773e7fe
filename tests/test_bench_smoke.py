"""The benchmark's functions at tiny size (a 1.5k x 1.5k pyramid built from the real slides and
used as the only slide), so that `make bench` does not first break after minutes of work."""

from __future__ import annotations

from pathlib import Path

import openslide

from bench.pyramid import PyramidSpec, build_pyramid
from bench.run import Config, run, table


def test_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    slide = tmp_path / "large-slide.tiff"  # where run() builds the pyramid
    cfg = Config(
        pyramid=PyramidSpec(tiles_per_side=6, smallest_side=256, tissue_bases=4),
        band_candidates=20,
        small_reps=1,
        large_reps=1,
        seed_reps=1,
        seed_rows=1,
        breakdown_sample=10,
        ray_rounds=1,
        work_dir=tmp_path,
        slides=(("tiny", slide),),
    )
    results = run(cfg, log=lambda _: None)
    with openslide.OpenSlide(str(slide)) as osr:
        assert [d[0] for d in osr.level_dimensions] == [1536, 768, 384, 192]
        assert float(osr.properties["openslide.mpp-x"]) == 0.5
    for key in (
        "preprocess_vs_raw_decode_ratio",
        "preprocess_vs_raw_decode_ratio_tiny",
        "fast_vs_seed_filter_speedup",
        "fast_vs_seed_jaccard",
        "ray_2_vs_1_worker_speedup",
        "filter_worker_peak_rss_mb",
        "tiling_peak_rss_mb",
        "pyramid_size_mb",
    ):
        assert isinstance(results[key], float) and results[key] > 0, key
    assert all(isinstance(v, str) for k, v in results.items() if k.startswith("_"))
    assert "preprocess_vs_raw_decode_ratio" in table(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large-slide.json", "large-slide.tiff"]
    assert build_pyramid(slide, cfg.pyramid_sources, cfg.pyramid).reused
