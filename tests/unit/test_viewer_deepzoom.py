"""The viewer's DeepZoom tiler: levels and tile sizes as its DZI descriptor says, pixels as a
direct `Slide.read` of the same region (downsampled by a block mean where levels differ)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolifscore.core.wsi.slide import open_slide
from prolifscore.synthetic.pyramid import write_image_pyramid
from prolifscore.viewer.deepzoom import DeepZoom, OpenSlides, TileCache, TileNotFound
from tests.slides import CMU, KIDNEY

pytestmark = pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level tiled TIFF (levels 1, 2, 4) cut from a real slide, odd-sized on purpose."""
    with open_slide(CMU) as s:
        image = s.read(400, 900, 0, 1100, 901)
    path = tmp_path_factory.mktemp("dz") / "pyramid.tiff"
    write_image_pyramid(path, image, mpp=0.5, smallest_side=300)
    return path


def descriptor(dz: DeepZoom) -> tuple[int, int, int, int]:
    xml = dz.dzi()
    size = re.search(r'<Size Width="(\d+)" Height="(\d+)"', xml)
    tile = re.search(r'TileSize="(\d+)"', xml)
    overlap = re.search(r'Overlap="(\d+)"', xml)
    assert size and tile and overlap, xml
    return int(size[1]), int(size[2]), int(tile[1]), int(overlap[1])


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.mark.parametrize("which", ["cmu", "pyramid", "kidney"])
def test_levels_and_tile_sizes_match_the_descriptor(which: str, pyramid: Path) -> None:
    path = {"cmu": CMU, "pyramid": pyramid, "kidney": KIDNEY}[which]
    with open_slide(path) as slide:
        dz = DeepZoom(slide, tile_size=256)
        width, height, tile, overlap = descriptor(dz)
        assert (width, height) == slide.dimensions and tile == 256 and overlap == 0
        # DeepZoom's pyramid: level N-1 is full size, each level below half (rounded up), to 1 px
        assert dz.level_count == math.ceil(math.log2(max(width, height))) + 1
        for level in range(dz.level_count):
            scale = 2 ** (dz.level_count - 1 - level)
            w, h = math.ceil(width / scale), math.ceil(height / scale)
            assert dz.level_dimensions[level] == (w, h)
            cols, rows = math.ceil(w / tile), math.ceil(h / tile)
            assert dz.level_tiles[level] == (cols, rows)
            if cols * rows > 30:
                continue  # the full-size levels: their corner tiles below
            for col in range(cols):
                for row in range(rows):
                    got = decode(dz.tile_jpeg(level, col, row))
                    assert got.shape == (min(tile, h - row * tile), min(tile, w - col * tile), 3)
        top = dz.level_count - 1
        cols, rows = dz.level_tiles[top]
        last = decode(dz.tile_jpeg(top, cols - 1, rows - 1))
        assert last.shape[:2] == (height - (rows - 1) * tile, width - (cols - 1) * tile)
        for bad in ((top + 1, 0, 0), (top, cols, 0), (top, 0, rows), (-1, 0, 0)):
            with pytest.raises(TileNotFound):
                dz.tile_jpeg(*bad)


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[0] // k, a.shape[1] // k
    return a[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))


def test_pixels_equal_a_direct_read(pyramid: Path) -> None:
    with open_slide(pyramid) as slide:
        assert [round(d) for d in slide.level_downsamples] == [1, 2, 4]
        dz = DeepZoom(slide)
        top = dz.level_count - 1
        # Full size: level 0 itself, 1:1.
        assert dz.slide_level(top) == 0
        np.testing.assert_array_equal(dz.tile_rgb(top, 1, 2), slide.read(256, 512, 0, 256, 256))
        # Half size: read 1:1 from slide level 1 (x, y stay level-0 coordinates).
        assert dz.slide_level(top - 1) == 1
        np.testing.assert_array_equal(dz.tile_rgb(top - 1, 1, 0), slide.read(512, 0, 1, 256, 256))
        # An eighth: no slide level that coarse, so level 2 (1/4) read and halved.
        assert dz.slide_level(top - 3) == 2
        got = dz.tile_rgb(top - 3, 0, 0).astype(np.float64)
        assert got.shape == (113, 138, 3)  # ceil(901/8), ceil(1100/8)
        level2 = slide.read(0, 0, 2, 275, 226)  # all of level 2 (1100 x 901 halved twice)
        assert np.abs(got[:, :137] - block_mean(level2, 2)).max() <= 1.0
        # the last column covers one level-2 column: its pixels' mean, pairwise down the rows
        edge = level2[:, 274].astype(np.float64).reshape(113, 2, 3).mean(axis=1)
        assert np.abs(got[:, 137] - edge).max() <= 1.0


def test_single_level_slides_downsample_from_level_0() -> None:
    with open_slide(CMU) as slide:
        dz = DeepZoom(slide)
        level = dz.level_count - 2  # half size
        got = dz.tile_rgb(level, 1, 1).astype(np.float64)
        want = block_mean(slide.read(512, 512, 0, 512, 512), 2)
        assert np.abs(got - want).max() <= 1.0
        # the JPEG is that image, up to compression
        jpeg = decode(dz.tile_jpeg(level, 1, 1)).astype(np.float64)
        assert np.abs(jpeg - got).mean() < 4.0


def test_edge_tiles_average_the_pixels_they_cover() -> None:
    with open_slide(KIDNEY) as slide:  # tiffslide, 1493 x 901, one level
        assert slide.backend == "tiffslide"
        dz = DeepZoom(slide)
        level = dz.level_count - 3  # a quarter
        got = dz.tile_rgb(level, 0, 0).astype(np.float64)
        assert got.shape == (226, 256, 3)  # ceil(901/4) rows; the last covers 1 source row
        pixels = slide.read(0, 0, 0, 1024, 901)
        assert np.abs(got[:225] - block_mean(pixels[:900], 4)).max() <= 1.0
        last = pixels[900].astype(np.float64).reshape(256, 4, 3).mean(axis=1)
        assert np.abs(got[225] - last).max() <= 1.0


def test_area_filter_where_levels_are_no_whole_factor_apart() -> None:
    from prolifscore.viewer.deepzoom import shrink

    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
    out = shrink(pixels, 200, 200, factor=0)  # 1.5x: an area filter
    assert out.shape == (200, 200, 3)
    assert abs(out.astype(np.float64).mean() - pixels.mean()) < 1.0


def test_tile_cache_is_bounded_and_keeps_recent_tiles() -> None:
    cache = TileCache(max_bytes=10)
    cache.put(("a",), b"1234")
    cache.put(("b",), b"1234")
    assert cache.get(("a",)) == b"1234"  # a is now the most recent
    cache.put(("c",), b"1234")  # 12 bytes > 10: the least recent (b) goes
    assert cache.get(("b",)) is None and cache.get(("a",)) and cache.get(("c",))
    assert cache.bytes == 8
    cache.put(("huge",), b"x" * 11)  # larger than the cache: not kept
    assert cache.get(("huge",)) is None and cache.bytes == 8


def test_open_slides_are_reused_and_closed_only_when_unused(pyramid: Path) -> None:
    slides = OpenSlides(capacity=1, tile_size=256, quality=80)
    closed: list[str] = []
    with slides.deepzoom(CMU) as first:
        with slides.deepzoom(CMU) as again:
            assert again is first
        first.slide.close = lambda: closed.append("cmu")  # type: ignore[method-assign]
        with slides.deepzoom(pyramid) as other:  # evicts CMU while it is still being read
            assert other.slide.path == pyramid
            assert closed == []
            assert first.tile_jpeg(first.level_count - 1, 0, 0)  # still readable
    assert closed == ["cmu"]
    slides.close()
