"""Opening slides, the tiffslide fallback, path confinement and readable errors."""

import numpy as np
import pytest

from prolifscore.core.wsi.slide import (
    SlideNotFound,
    SlidePathDenied,
    SlideUnreadable,
    confine_path,
    open_slide,
)
from tests.slides import BROKEN, CMU, KIDNEY, SLIDES, TCGA


def test_openslide_and_metadata():
    with open_slide(CMU) as s:
        assert s.backend == "openslide" and s.base_mpp() == pytest.approx(0.499)
        tile = s.read(0, 0, 0, 256)
        assert tile.shape == (256, 256, 3) and tile.dtype.name == "uint8"
    with open_slide(TCGA) as s:
        assert s.base_mpp() is None and s.level_count == 2


def test_plain_tiff_falls_back_to_tiffslide():
    with open_slide(KIDNEY) as s:
        assert s.backend == "tiffslide" and s.dimensions == (1493, 901)
        assert s.read(100, 100, 0, 64).shape == (64, 64, 3)


def test_broken_slide_is_a_readable_error():
    with pytest.raises(SlideUnreadable, match=r"broken\.svs"):
        open_slide(BROKEN)


def test_confinement(tmp_path):
    assert confine_path(CMU, [SLIDES]) == CMU.resolve()
    assert confine_path(CMU.name, [SLIDES]) == CMU.resolve()  # relative to the first root
    with pytest.raises(SlidePathDenied):
        confine_path(CMU, [tmp_path])
    with pytest.raises(SlidePathDenied):
        confine_path(SLIDES / ".." / ".." / "DESIGN.md", [SLIDES])
    with pytest.raises(SlideNotFound):
        confine_path(SLIDES / "missing.svs", [SLIDES])


def test_symlink_out_of_root_denied(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape.svs").symlink_to(CMU)
    with pytest.raises(SlidePathDenied):
        confine_path(root / "escape.svs", [root])


def _public_read(slide, x, y, level, w, h):
    """RGB through openslide-python's public read_region (PIL), as Slide.read once did."""
    image = slide._h.read_region((x, y), level, (w, h))
    rgba = np.asarray(image)
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


@pytest.mark.parametrize("path", [CMU, TCGA], ids=["cmu", "tcga"])
def test_fast_read_equals_public_read_region(path):
    """Slide.read decodes into a numpy buffer (no PIL image); the pixels are the same, also
    where the region leaves the slide (transparent -> white) and on a coarse level."""
    with open_slide(path) as s:
        assert s.backend == "openslide"
        w, h = s.dimensions
        regions = [(x, y, 0, 256, 256) for x in range(0, w - 256, 331) for y in (0, h // 2)]
        regions += [(w - 100, h - 100, 0, 256, 256), (-50, -30, 0, 300, 200)]
        regions.append((0, 0, s.level_count - 1, *s.level_dimensions[-1]))
        for region in regions:
            assert np.array_equal(s.read(*region), _public_read(s, *region)), region
