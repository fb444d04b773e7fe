"""The real tissue synthetic data is made of: the shared sample slides, read whole at
0.5 um/px, and tissue-rich windows and tiles cut from them in any of 8 orientations."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from prolifscore.core.wsi.tissue import od_tissue_mask
from prolifscore.synthetic.pyramid import TILE, tissue_level

DEFAULT_SOURCES = ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs")
# The TCGA slide has no mpp metadata; its level-0 nuclei measure like 20x (8-10 um = 16-20 px),
# so it is read at level 0 as 0.5 um/px rather than at the pipeline's 40x assumption.
SOURCE_ASSUMED_MPP = 0.5
SYNTHETIC_MPP = 0.5


def default_source_dir() -> Path:
    """The real sample slides: PROLIF_TEST_SLIDES, else ../shared/data/slides beside the
    checkout. The one definition the demo, the benchmarks and the tests share."""
    checkout = Path(__file__).resolve().parents[3]
    return Path(os.environ.get("PROLIF_TEST_SLIDES", checkout.parent / "shared/data/slides"))


@lru_cache(maxsize=4)
def _source_levels(paths: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    """Whole source slides at 0.5 um/px (read once per process: a few seconds)."""
    return tuple(
        tissue_level(p, target_mpp=SYNTHETIC_MPP, assumed_mpp=SOURCE_ASSUMED_MPP) for p in paths
    )


def sources(source_dir: Path | None) -> tuple[np.ndarray, ...]:
    """The source slides in `source_dir` (default: `default_source_dir`) at 0.5 um/px."""
    folder = Path(source_dir) if source_dir else default_source_dir()
    paths = tuple(folder / name for name in DEFAULT_SOURCES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"source slides missing: {', '.join(missing)}")
    return _source_levels(paths)


# Values keep their level alive, so that its id() cannot be reused by another array.
_WINDOWS: dict[tuple[int, int, float, int], tuple[np.ndarray, np.ndarray]] = {}


def tissue_windows(level: np.ndarray, size: int, min_share: float, step: int) -> np.ndarray:
    """Top-left (y, x) of every `size` window (on a `step` grid) with tissue share >= min
    (cached per source level: the sources are cached too)."""
    key = (id(level), size, min_share, step)
    if key not in _WINDOWS:
        _WINDOWS[key] = (level, _find_windows(level, size, min_share, step))
    return _WINDOWS[key][1]


def _find_windows(level: np.ndarray, size: int, min_share: float, step: int) -> np.ndarray:
    mask = od_tissue_mask(level).astype(np.int32)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = np.arange(0, level.shape[0] - size + 1, step)
    xs = np.arange(0, level.shape[1] - size + 1, step)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    total = (
        integral[y0 + size, x0 + size]
        - integral[y0, x0 + size]
        - integral[y0 + size, x0]
        + integral[y0, x0]
    )
    keep = total >= min_share * size * size
    return np.stack([y0[keep], x0[keep]], axis=1)


def orient(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of a square array."""
    return np.ascontiguousarray(np.rot90(a[:, ::-1] if k >= 4 else a, k % 4))


def sample_crop(
    levels: Sequence[np.ndarray],
    windows: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A random tissue-rich `size` crop of a random source, in a random orientation."""
    candidates = [i for i, w in enumerate(windows) if len(w)]
    src = int(rng.choice(candidates))
    y, x = windows[src][int(rng.integers(len(windows[src])))]
    return orient(levels[src][y : y + size, x : x + size], int(rng.integers(8)))


def _pipeline_tissue_tiles(level: np.ndarray, block: int = 16, min_block: float = 0.1) -> list:
    """Top-left (y, x) of the 256 px tiles (every 128 px) that the pipeline's fast tissue
    criterion keeps: >= 95% of their 16 px blocks hold >= 10% OD-tissue pixels (see
    prolifscore.core.wsi.tissue). A plain OD share would reject the pale TCGA tissue."""
    h, w = (level.shape[0] // block) * block, (level.shape[1] // block) * block
    mask = od_tissue_mask(level[:h, :w]).reshape(h // block, block, w // block, block)
    blocks = (mask.mean(axis=(1, 3)) >= min_block).astype(np.int32)
    integral = np.pad(blocks.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    n, step = TILE // block, (TILE // 2) // block
    out = []
    for i in range(0, blocks.shape[0] - n + 1, step):
        for j in range(0, blocks.shape[1] - n + 1, step):
            inside = (
                integral[i + n, j + n] - integral[i, j + n] - integral[i + n, j] + integral[i, j]
            )
            if inside >= 0.95 * n * n:
                out.append((i * block, j * block))
    return out


def source_tiles(source_dir: Path | None) -> list[np.ndarray]:
    """Tissue-rich 256 px tiles of all sources (~70 cmu + ~390 TCGA bases, x 8 orientations
    when placed), so that the pipeline keeps nearly every tile of a synthetic slide."""
    tiles = [
        level[y : y + TILE, x : x + TILE]
        for level in sources(source_dir)
        for y, x in _pipeline_tissue_tiles(level)
    ]
    if not tiles:
        raise ValueError("no tissue-rich tile in the source slides")
    return tiles
