"""Viewer benchmark: DeepZoom tiles served over HTTP against bare OpenSlide decode.

Viewer side: a real viewer service (`prolifscore.viewer.server.serve`, free port, this process,
its threaded HTTP server) asked for 256 px JPEG DeepZoom tiles of the large benchmark slide over
keep-alive HTTP connections: URL parsing, path confinement, slide level choice, `Slide.read`,
JPEG encode, response. The tile cache is off (PROLIF_VIEWER_TILE_CACHE_MB=0): every tile is
cold, as when a user pans onto new ground. Two ways of asking: as a browser does (OpenSeadragon
fetches the tiles of a view in parallel; browsers keep up to 6 connections per host), over
`connections` connections at once (`viewer_tiles_per_s`); and one tile at a time over one
connection (`viewer_sequential_tiles_per_s`).

Decode side: `openslide.OpenSlide.read_region` of the same regions (same level, location and
size), the slide opened once, single-threaded; and `Slide.read` of them, the decode the viewer
itself uses. Tiles are drawn at random from the full-resolution DeepZoom level and the three
below it, which read the pyramid's levels 0-3 one to one. The sides take turns chunk by chunk
(order rotating), so that other load on the machine falls on all alike; best of `reps` totals
each. The file is read once beforehand, so every side starts from the OS page cache.

`python -m bench.viewer` runs it alone on the cached (or newly built) large slide; `--side N`
builds a smaller pyramid (N x 256 px a side) with the same code path, for quick iterations.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from bench import CMU, TCGA, WORK_DIR
from bench.large_slide import PyramidSpec, build_pyramid
from bench.pipeline import warm_file_cache
from prolifscore.core.runtime.settings import load
from prolifscore.core.wsi.slide import open_slide
from prolifscore.viewer.config import ViewerSettings
from prolifscore.viewer.deepzoom import DeepZoom, TileRegion
from prolifscore.viewer.server import serve

Tile = tuple[int, int, int]  # DeepZoom level, column, row
Sample = tuple[float, float]  # (wall seconds, CPU seconds of this process, all threads)
SIDES = ("viewer", "viewer_sequential", "decode", "slide_read")


@dataclass(frozen=True)
class ViewerBenchConfig:
    tiles: int = 800  # distinct tiles per sample
    reps: int = 5  # samples per side
    chunk: int = 40  # tiles per turn: the sides take turns chunk by chunk
    connections: int = 4  # parallel HTTP connections of the browser-like side
    levels_below_full: int = 3  # DeepZoom levels sampled under the full-resolution one
    tile_size: int = 256
    quality: int = 80
    seed: int = 0


def pick_tiles(dz: DeepZoom, cfg: ViewerBenchConfig) -> list[Tile]:
    """Distinct full tiles (the partial last row and column left out), spread over the sampled
    levels in proportion to their tile counts."""
    rng = np.random.default_rng(cfg.seed)
    top = dz.level_count - 1
    levels = range(max(0, top - cfg.levels_below_full), top + 1)
    full = {level: (dz.level_tiles[level][0] - 1, dz.level_tiles[level][1] - 1) for level in levels}
    total = sum(c * r for c, r in full.values())
    pool: list[Tile] = []
    for level, (cols, rows) in full.items():
        count = min(cols * rows, round(cfg.tiles * cols * rows / max(1, total)))
        picks = rng.choice(cols * rows, count, replace=False) if count else []
        pool += [(level, int(i % cols), int(i // cols)) for i in picks]
    return pool[: cfg.tiles]


def _clock() -> Sample:
    return time.perf_counter(), time.process_time()


class _Sides:
    """The ways of getting the same tiles, each with its handles open (HTTP connections,
    OpenSlide, Slide) so that a chunk of tiles times only the per-tile work."""

    def __init__(self, url: str, name: str, path: Path, connections: int) -> None:
        import openslide

        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.conns = [
            http.client.HTTPConnection(host, int(port), timeout=60) for _ in range(connections)
        ]
        self.pool = ThreadPoolExecutor(connections)
        self.name = name
        self.osr = openslide.OpenSlide(str(path))
        self.slide = open_slide(path)

    def _get(self, conn: http.client.HTTPConnection, tiles: list[Tile]) -> None:
        for level, col, row in tiles:
            conn.request("GET", f"/dzi/{self.name}_files/{level}/{col}_{row}.jpeg")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or not body.startswith(b"\xff\xd8"):
                raise RuntimeError(f"tile {level}/{col}_{row}: HTTP {resp.status}")

    def viewer(self, tiles: list[Tile], _regions: list[TileRegion]) -> None:
        n = len(self.conns)
        list(self.pool.map(self._get, self.conns, [tiles[i::n] for i in range(n)]))

    def viewer_sequential(self, tiles: list[Tile], _regions: list[TileRegion]) -> None:
        self._get(self.conns[0], tiles)

    def decode(self, _tiles: list[Tile], regions: list[TileRegion]) -> None:
        for r in regions:
            self.osr.read_region((r.x0, r.y0), r.level, (r.width, r.height))

    def slide_read(self, _tiles: list[Tile], regions: list[TileRegion]) -> None:
        for r in regions:
            self.slide.read(r.x0, r.y0, r.level, r.width, r.height)

    def sample(self, tiles: list[Tile], regions: list[TileRegion], chunk: int, rep: int) -> dict:
        """One sample of each side over all tiles, taking turns chunk by chunk."""
        total = {side: (0.0, 0.0) for side in SIDES}
        for i in range(0, len(tiles), chunk):
            shift = (rep + i // chunk) % len(SIDES)
            for side in SIDES[shift:] + SIDES[:shift]:
                wall, cpu = _clock()
                getattr(self, side)(tiles[i : i + chunk], regions[i : i + chunk])
                now = _clock()
                total[side] = (total[side][0] + now[0] - wall, total[side][1] + now[1] - cpu)
        return total

    def close(self) -> None:
        self.pool.shutdown()
        for conn in self.conns:
            conn.close()
        self.osr.close()
        self.slide.close()


def bench_viewer(cfg: ViewerBenchConfig, slide_path: Path, out: dict[str, Any]) -> None:
    load_before = os.getloadavg()[0]
    warm_file_cache(slide_path)
    with open_slide(slide_path) as slide:
        dz = DeepZoom(slide, cfg.tile_size, cfg.quality)
        tiles = pick_tiles(dz, cfg)
        regions = [dz.region(*t) for t in tiles]
    assert all(r.factor == 1 for r in regions), "the sampled levels read the pyramid 1:1"
    base = load(ViewerSettings, environ={})
    settings = replace(
        base,
        runtime=replace(base.runtime, slide_roots=(slide_path.parent,), metrics_port=0),
        port=0,
        tile_size=cfg.tile_size,
        jpeg_quality=cfg.quality,
        tile_cache_mb=0,
    )
    runtime, service = serve(settings)
    sides = _Sides(service.url, quote(slide_path.name), slide_path, cfg.connections)
    samples: dict[str, list[Sample]] = {side: [] for side in SIDES}
    try:
        sides.viewer(tiles[:20], regions[:20])  # the server opens the slide
        for rep in range(cfg.reps):
            for side, sample in sides.sample(tiles, regions, cfg.chunk, rep).items():
                samples[side].append(sample)
    finally:
        sides.close()
        service.stop()
        runtime.stop()
    tps = {side: len(tiles) / min(w for w, _ in v) for side, v in samples.items()}
    cpu = {side: min(c for _, c in v) for side, v in samples.items()}
    out["viewer_tiles_per_s"] = round(tps["viewer"], 1)
    out["viewer_sequential_tiles_per_s"] = round(tps["viewer_sequential"], 1)
    out["viewer_decode_tiles_per_s"] = round(tps["decode"], 1)
    out["viewer_vs_decode_ratio"] = round(tps["viewer"] / tps["decode"], 3)
    out["viewer_sequential_vs_decode_ratio"] = round(tps["viewer_sequential"] / tps["decode"], 3)
    out["viewer_vs_decode_cpu_ratio"] = round(cpu["decode"] / cpu["viewer"], 3)
    out["viewer_sequential_vs_slide_read_ratio"] = round(
        tps["viewer_sequential"] / tps["slide_read"], 3
    )
    loads = (load_before, os.getloadavg()[0])
    out["_note_viewer"] = _note(cfg, slide_path, tiles, tps, samples, loads)


def _note(
    cfg: ViewerBenchConfig,
    slide_path: Path,
    tiles: list[Tile],
    tps: dict[str, float],
    samples: dict[str, list[Sample]],
    loads: tuple[float, float],
) -> str:
    levels = sorted({t[0] for t in tiles})
    return (
        f"{len(tiles)} distinct {cfg.tile_size} px JPEG (q{cfg.quality}) DeepZoom tiles of "
        f"{slide_path.name}, DeepZoom levels {levels} (pyramid levels 0-{len(levels) - 1}, read "
        "1:1), tile cache off (cold: every tile read and encoded), from the viewer service in "
        f"this process: viewer = over {cfg.connections} keep-alive connections at once, as "
        "OpenSeadragon in a browser fetches a view's tiles (the threaded server decodes them "
        "side by side: OpenSlide and the JPEG encoder release the GIL); viewer_sequential = one "
        "tile at a time over one connection. Against openslide read_region of the same regions, "
        "single-threaded, slide opened once (decode), and Slide.read of them (the viewer's own "
        "decode, so 1 - viewer_sequential_vs_slide_read_ratio is what JPEG encoding, HTTP and "
        "path checks add per tile). viewer_vs_decode_cpu_ratio = decode CPU seconds / viewer "
        "CPU seconds (this process, all threads: server and client), the cost in cores, which "
        f"threads cannot hide. Sides take turns every {cfg.chunk} tiles (order rotating); best "
        f"of {cfg.reps} each: "
        + ", ".join(f"{k} {v:.0f}" for k, v in tps.items())
        + " tiles/s; samples (s): "
        + "; ".join(f"{k} {[round(w, 2) for w, _ in v]}" for k, v in samples.items())
        + f". 1-min load average {loads[0]:.1f} before, {loads[1]:.1f} after (above ~0: other "
        "processes shared the 2 cores)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.viewer", description=__doc__)
    parser.add_argument(
        "--side", type=int, default=0, help="tiles per side of a smaller pyramid (0: the large)"
    )
    args = parser.parse_args(argv)
    spec = PyramidSpec()
    path = WORK_DIR / "large-slide.tiff"
    if args.side:
        spec = replace(spec, tiles_per_side=args.side)
        path = WORK_DIR / f"viewer-slide-{args.side}.tiff"
    info = build_pyramid(path, (CMU, TCGA), spec)
    out: dict[str, Any] = {}
    bench_viewer(ViewerBenchConfig(), info.path, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
