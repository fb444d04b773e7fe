"""The benchmark's functions at tiny size (a 1.5k x 1.5k pyramid built from the real slides and
used as the only slide; the scoring part on the small real slide with a 64 px tumor model), so
that `make bench` does not first break after minutes of work."""

from __future__ import annotations

from pathlib import Path

import openslide
import pytest

from bench import CMU
from bench.large_slide import PyramidSpec, build_pyramid
from bench.run import Config, merge, run, selected, table
from bench.scoring import ScoringConfig, bench_scoring


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
        scoring=None,  # test_scoring_bench_at_tiny_size
    )
    results = run(cfg, log=lambda _: None)
    with openslide.OpenSlide(str(slide)) as osr:
        assert [d[0] for d in osr.level_dimensions] == [1536, 768, 384, 192]
        assert float(osr.properties["openslide.mpp-x"]) == 0.5
    for key in (
        "preprocess_vs_raw_decode_ratio",
        "preprocess_vs_raw_decode_ratio_tiny",
        "preprocess_vs_raw_decode_cpu_ratio",
        "preprocess_vs_raw_decode_cpu_ratio_tiny",
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


def test_sections_and_merge() -> None:
    assert selected(["scoring"]) == {"scoring"}
    assert selected(["ray"]) == {"ray", "ratio", "pyramid"}
    assert selected(None) >= {"pyramid", "scoring"} and "whole_slide" not in selected(None)
    assert selected(["whole_slide"]) == {"whole_slide", "pyramid"}
    with pytest.raises(ValueError, match="unknown"):
        selected(["nope"])
    full = {"a": 1.0, "b": 2.0, "bench_seconds": 9.0, "_note": "full", "_note_sections": "x"}
    partial = {"b": 3.0, "bench_seconds": 1.0, "_note": "part", "_note_sections": "scoring 1 s"}
    merged = merge(full, partial)
    assert merged["a"] == 1.0 and merged["b"] == 3.0 and merged["_note"] == "full"
    assert merged["bench_seconds"] == 9.0 and merged["bench_seconds_partial"] == 1.0
    assert "scoring 1 s" in merged["_note_partial"]


@pytest.mark.slow
def test_scoring_bench_at_tiny_size(tmp_path: Path) -> None:
    """Model server child + in-process ScoringService, both sides of the ratio, the profile,
    pipelined vs sequential (Ray reader comparison left out: Ray start-up is slow)."""
    cfg = ScoringConfig(
        slides=(("cmu", CMU),),
        model_root=tmp_path / "models",
        tumor_input_size=64,
        reps=1,
        overlap_rounds=1,
        ray_readers=0,
        profile=True,
        work_dir=tmp_path,
    )
    out: dict = {}
    bench_scoring(cfg, out, log=lambda _: None)
    for key in (
        "scoring_vs_direct_model_ratio",
        "scoring_vs_direct_model_ratio_cmu",
        "pipelined_vs_sequential_speedup",
        "pipelined_vs_sequential_speedup_max",
        "scoring_vs_direct_model_cpu_ratio",
        "scoring_grpc_kept_tiles_per_s",
    ):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert "model_client.py" in out["_note_scoring_profile"]
    assert "ray_readers_vs_thread_speedup" not in out
    assert all(isinstance(v, str) for k, v in out.items() if k.startswith("_"))
