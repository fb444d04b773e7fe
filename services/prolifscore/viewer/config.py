"""Viewer service settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from prolifscore.core.runtime.settings import PreprocessSettings, RuntimeSettings, env, nested


@dataclass(frozen=True)
class ViewerSettings:
    """Slides come from PROLIF_SLIDE_ROOTS and results from PROLIF_RESULTS_ROOT, both only
    read; the tiling spec settings give the scored tiles' size where a result cannot."""

    runtime: RuntimeSettings = nested(RuntimeSettings)
    preprocess: PreprocessSettings = nested(PreprocessSettings)
    port: int = env(
        "PROLIF_VIEWER_PORT", 8088, "Viewer HTTP port (pages, API, tiles; 0 = any free)"
    )
    tile_size: int = env("PROLIF_VIEWER_TILE_SIZE", 256, "DeepZoom tile side in pixels")
    jpeg_quality: int = env("PROLIF_VIEWER_JPEG_QUALITY", 80, "JPEG quality of DeepZoom tiles")
    tile_cache_mb: int = env(
        "PROLIF_VIEWER_TILE_CACHE_MB", 256, "Memory for encoded tiles already served (0 = none)"
    )
    open_slides: int = env(
        "PROLIF_VIEWER_OPEN_SLIDES", 8, "Slides kept open between requests (opening is slow)"
    )
