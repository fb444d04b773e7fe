"""Level / scale selection and the tile grid."""

import pytest

from prolifscore.core.wsi.geometry import resolve_geometry, target_mpp_from


def test_20x_slide_reads_level0_without_resize():
    g = resolve_geometry((2220, 2967), [1.0], 0.499, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size, g.footprint0, g.stride0) == (0, 256, 256, 256)
    assert not g.needs_resize
    assert (g.cols, g.rows) == (8, 11)  # partial edge tiles dropped: 2220 // 256, 2967 // 256


def test_40x_pyramid_picks_level_with_matching_downsample():
    g = resolve_geometry((40000, 30000), [1.0, 4.0, 16.0], 0.25, target_mpp=0.5, tile_size=256)
    # 2x is needed; level 1 (4x) is too coarse, so read 512 px at level 0 and shrink.
    assert (g.level, g.read_size, g.footprint0) == (0, 512, 512)
    g = resolve_geometry((40000, 30000), [1.0, 2.0, 8.0], 0.25, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size, g.footprint0) == (1, 256, 512)
    assert not g.needs_resize


def test_nearly_matching_downsample_is_not_resized():
    g = resolve_geometry((4443, 3567), [1.0, 2.0005], 0.25, target_mpp=0.5, tile_size=256)
    assert (g.level, g.read_size) == (1, 256)


def test_missing_metadata_uses_assumed_mpp():
    g = resolve_geometry((1000, 1000), [1.0], None, target_mpp=0.5, tile_size=256, assumed_mpp=0.5)
    assert g.base_mpp_assumed and g.base_mpp == 0.5 and g.read_size == 256


def test_overlap_shrinks_stride_and_adds_tiles():
    plain = resolve_geometry((1024, 512), [1.0], 0.5, target_mpp=0.5, tile_size=256)
    over = resolve_geometry((1024, 512), [1.0], 0.5, target_mpp=0.5, tile_size=256, overlap=64)
    assert over.stride0 == 192 and over.cols == 5 and plain.cols == 4
    assert list(over.grid())[1] == (1, 0, 192, 0)


def test_slide_smaller_than_a_tile_has_empty_grid():
    g = resolve_geometry((100, 100), [1.0], 0.5, target_mpp=0.5, tile_size=256)
    assert g.tile_count == 0 and list(g.grid()) == []


def test_magnification_and_mpp_targets():
    assert target_mpp_from(20, None, 0.25) == 0.5
    assert target_mpp_from(20, 0.3, 0.25) == 0.3
    assert target_mpp_from(None, None, 0.25) == 0.25


@pytest.mark.parametrize("size,overlap", [(0, 0), (256, 256), (256, -1)])
def test_bad_spec_rejected(size, overlap):
    with pytest.raises(ValueError):
        resolve_geometry((1000, 1000), [1.0], 0.5, target_mpp=0.5, tile_size=size, overlap=overlap)
