"""Tissue masks and both tissue criteria, on real tiles."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from prolifscore.core.wsi.geometry import mask_downsample_for, resolve_geometry
from prolifscore.core.wsi.od import od_intensity_cutoff, od_tissue_mask, optical_density
from prolifscore.core.wsi.slide import open_slide
from prolifscore.core.wsi.tissue import (
    FastCriterion,
    _fill_holes,
    compute_coverage_map,
    reference_keep,
)
from prolifscore.synthetic.pyramid import write_image_pyramid
from tests.slides import CMU, KIDNEY, TCGA


def test_od_cutoff_matches_the_logarithmic_definition():
    values = np.arange(256, dtype=np.uint8).reshape(-1, 1, 1).repeat(3, axis=2)
    by_log = (optical_density(values) >= 0.15).all(axis=2).ravel()
    by_cutoff = od_tissue_mask(values).ravel()
    assert od_intensity_cutoff(0.15) == 205
    assert (by_log == by_cutoff).all()


def test_fill_holes_equals_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = ndi.binary_opening(rng.random((64, 64)) > 0.4)
        assert (_fill_holes(mask) == ndi.binary_fill_holes(mask)).all()


@pytest.mark.filterwarnings("ignore:`binary_.*` is deprecated:FutureWarning")
def test_shifted_morphology_equals_scikit_image():
    """scikit-image's borders, which the reference called: outside is background when
    dilating and foreground when eroding (scipy's own erosion default would eat the border)."""
    from skimage.morphology import binary_dilation, binary_erosion, disk

    from prolifscore.core.wsi.tissue import _morph

    rng = np.random.default_rng(3)
    for radius in (2, 10):
        for density in (0.6, 0.3, 0.05):
            mask = rng.random((96, 80)) > density
            assert (_morph(mask, radius, True) == binary_dilation(mask, disk(radius))).all()
            assert (_morph(mask, radius, False) == binary_erosion(mask, disk(radius))).all()
    full = np.ones((40, 40), bool)  # all tissue: erosion keeps it all, unlike scipy's default
    assert _morph(full, 10, False).all() and not ndi.binary_erosion(full, _disk_se(10)).all()


def _disk_se(radius: int) -> np.ndarray:
    from skimage.morphology import disk

    return disk(radius).astype(bool)


def literal_reference_fractions(tile: np.ndarray) -> tuple[float, float]:
    """The reference study's `keep_tile` measures written as it wrote them (SystemML
    breastcancer preprocessing.py): scikit-image closing and dilation with disk(10) / disk(2),
    scipy's fill holes, OD = -ln((I + 1) / 240) >= 0.15 in every channel."""
    from scipy.ndimage import binary_fill_holes
    from skimage.color import rgb2gray
    from skimage.feature import canny
    from skimage.morphology import binary_closing, binary_dilation, disk

    edges = canny(1 - rgb2gray(tile))
    edges = binary_fill_holes(binary_dilation(binary_closing(edges, disk(10)), disk(10)))
    od = -np.log((tile.astype(np.float64) + 1) / 240)
    dense = np.min(od >= 0.15, axis=2)
    dense = binary_fill_holes(binary_dilation(binary_closing(dense, disk(2)), disk(2)))
    return float(edges.mean()), float(dense.mean())


@pytest.mark.filterwarnings("ignore:`binary_.*` is deprecated:FutureWarning")  # as the reference
@pytest.mark.parametrize("path", [CMU, TCGA, KIDNEY], ids=["cmu", "tcga", "kidney"])
def test_reference_fractions_equal_a_literal_scikit_image_implementation(path):
    """Fractions, not only keep decisions, on every grid tile of the sample slides (borders
    included: that is where the two ways of eroding used to differ by up to ~5 points)."""
    from prolifscore.core.wsi.tissue import reference_tissue_fractions

    slide, g = _grid(path)
    tiles = list(g.grid())[:60]
    assert len(tiles) >= 2
    differences = 0
    for _, _, x, y in tiles:
        tile = slide.read(x, y, g.level, g.read_size)[: g.tile_size, : g.tile_size]
        ours = reference_tissue_fractions(tile)
        assert ours == literal_reference_fractions(tile), (x, y)
        differences += ours != (0.0, 0.0)
    assert differences  # tiles with tissue were compared, not only blank ones


def _grid(path):
    slide = open_slide(path)
    g = resolve_geometry(
        slide.dimensions, slide.level_downsamples, slide.base_mpp(), target_mpp=0.5, tile_size=256
    )
    return slide, g


@pytest.mark.parametrize("path", [CMU, TCGA])
def test_fast_criterion_agrees_with_seed_on_real_slides(path):
    """The fast mode's kept set must agree with the seed criterion at Jaccard >= 0.8 while
    reading fewer tiles than the seed (which reads all of them)."""
    slide, g = _grid(path)
    cmap = compute_coverage_map(slide, mask_downsample_for(g))
    fast = FastCriterion(0.9)
    seed_set, fast_set, read, checked = set(), set(), 0, 0
    for col, row, x, y in g.grid():
        tile = slide.read(x, y, g.level, g.read_size)
        if reference_keep(tile, 0.9)[0]:
            seed_set.add((col, row))
        cov = cmap.coverage(x, y, g.footprint0)
        if cov >= fast.candidate_min:
            read += 1
            checked += fast.needs_pixels(cov)
            if fast.keep(cov, tile)[0]:
                fast_set.add((col, row))
    assert seed_set, "the real slide has tissue tiles"
    jaccard = len(seed_set & fast_set) / len(seed_set | fast_set)
    assert jaccard >= 0.8
    assert checked < read < g.tile_count  # only borderline tiles get the full-resolution test


def test_coverage_map_sees_tissue_where_pixels_are_dark():
    slide, g = _grid(CMU)
    cmap = compute_coverage_map(slide, mask_downsample_for(g))
    assert cmap.thumbnail.shape[:2] == cmap.fraction.shape
    assert 0.0 < cmap.fraction.mean() < 1.0
    covs = [
        (cmap.coverage(x, y, g.footprint0), slide.read(x, y, 0, 256)) for _, _, x, y in g.grid()
    ]
    full = [float(od_tissue_mask(t).mean()) for _, t in covs]
    low = [c for c, _ in covs]
    assert np.corrcoef(low, full)[0, 1] > 0.8


def test_coverage_map_is_the_same_read_by_several_threads():
    """Strips decoded in parallel are reduced in order: one thread and three give the same
    map (small strips, so that there are many; the kidney TIFF is read in strips, through
    tiffslide)."""
    slide, g = _grid(KIDNEY)
    ds = mask_downsample_for(g)
    reads = []
    read = slide.read
    slide.read = lambda *a: reads.append(a) or read(*a)  # type: ignore[method-assign]
    one = compute_coverage_map(slide, ds, strip_bytes=1 << 16, threads=1)
    three = compute_coverage_map(slide, ds, strip_bytes=1 << 16, threads=3)
    assert len(reads) > 8  # many strips, not the thumbnail
    np.testing.assert_array_equal(one.fraction, three.fraction)
    np.testing.assert_array_equal(one.thumbnail, three.thumbnail)


def test_seed_criterion_rejects_background_and_keeps_dense_tissue():
    white = np.full((256, 256, 3), 240, np.uint8)
    assert reference_keep(white, 0.9)[0] is False
    slide, g = _grid(CMU)
    fractions = [reference_keep(slide.read(x, y, 0, 256), 0.9) for _, _, x, y in g.grid()]
    assert any(k for k, _ in fractions) and not all(k for k, _ in fractions)


@pytest.fixture(scope="module")
def cmu_pyramid(tmp_path_factory):
    """CMU as a tiled pyramid (downsamples 1 to 16): its map is read in strips of level 2."""
    with open_slide(CMU) as s:
        image = s.read(0, 0, 0, 2208, 2960)  # sides divisible by 16: exact downsamples
    path = tmp_path_factory.mktemp("pyramid") / "cmu.tiff"
    write_image_pyramid(path, image, mpp=0.5, smallest_side=300)
    return path


@pytest.mark.parametrize("which", ["thumbnail", "pyramid", "strips"])
def test_a_region_map_is_the_whole_maps_window_with_the_same_coverages(which, cmu_pyramid):
    """A region of interest's map reads only its window of the slide, and every square
    inside the region gets the coverage the whole-slide map gives it."""
    slide, g = _grid({"thumbnail": CMU, "pyramid": cmu_pyramid, "strips": KIDNEY}[which])
    if which == "pyramid":
        assert list(slide.level_downsamples[:3]) == [1, 2, 4]
    ds = mask_downsample_for(g)
    whole = compute_coverage_map(slide, ds, strip_bytes=1 << 16)
    x0, y0 = g.footprint0 + 37, g.footprint0 + 5  # not on the mask grid
    region = (x0, y0, x0 + 2 * g.footprint0, y0 + 2 * g.footprint0)
    part = compute_coverage_map(slide, ds, strip_bytes=1 << 16, region=region)
    (ox, oy), (h, w) = part.offset, part.fraction.shape
    assert (ox, oy) != (0, 0) and h * w < whole.fraction.size / 3
    np.testing.assert_array_equal(part.fraction, whole.fraction[oy : oy + h, ox : ox + w])
    np.testing.assert_array_equal(part.thumbnail, whole.thumbnail[oy : oy + h, ox : ox + w])
    xs, ys = np.meshgrid(
        np.arange(x0, region[2] - g.footprint0 + 1, 61), np.arange(y0, y0 + 300, 43)
    )
    xs, ys = xs.ravel(), ys.ravel()
    np.testing.assert_array_equal(
        part.coverages(xs, ys, g.footprint0), whole.coverages(xs, ys, g.footprint0)
    )
    assert [part.coverage(x, y, g.footprint0) for x, y in zip(xs, ys, strict=True)] == [
        whole.coverage(x, y, g.footprint0) for x, y in zip(xs, ys, strict=True)
    ]
