"""Stain normalization fitted once per slide and applied to every tile of that slide.

The seed project (Apache SystemML `projects/breast_cancer`, `normalize_staining`) refitted Macenko
on every 256 px sample, so a tile of mostly eosin or a tile with one nucleus got its own,
unstable stain vectors. Here a slide is fitted once, on a sample of its tissue pixels, and the
resulting fit (a few doubles that travel in the `StainFit` protobuf message) is turned into a
normalizer that costs one 3x3 matmul and one `exp` per tile.

Fit on pixels at the resolution the tiles are cut at (e.g. a few tissue tiles picked with the
low-resolution mask), not on a thumbnail: downsampling blurs dark nuclei, which lowers the 99th
percentile concentrations (CMU-1: [2.24, 2.05] on a 512 px thumbnail, [3.58, 2.70] on its level-0
tissue tiles) and so over-darkens every normalized tile. Stain directions move less (~5 degrees).

Optical density and which pixels are tissue follow `od` (docs/architecture.md, section 6), as
the tiling tissue mask does.

Two methods:

- Macenko et al. 2009 (`fit_macenko`, `MacenkoNormalizer`), mapping to the reference (seed)
  study's H&E reference (`SYSTEMML_REFERENCE`, converted to this module's OD convention; see
  there).
- Reinhard et al. 2001 in CIELAB (`fit_reinhard`, `ReinhardNormalizer`): match the per-channel
  mean and standard deviation of tissue pixels to `REINHARD_REFERENCE`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prolifscore.core.wsi.od import BETA, IO, od_lut, od_tissue_mask

__all__ = [
    "MACENKO_2009_REFERENCE",
    "MIN_TISSUE_PIXELS",
    "REINHARD_REFERENCE",
    "SYSTEMML_REFERENCE",
    "MacenkoFit",
    "MacenkoNormalizer",
    "ReinhardFit",
    "ReinhardNormalizer",
    "StainFitError",
    "fit_macenko",
    "fit_reinhard",
]

MIN_TISSUE_PIXELS = 100  # fewer tissue pixels than this cannot give stable percentiles
MAX_FIT_PIXELS = 1_000_000  # fits sample at most this many tissue pixels (fixed seed)

# Two unit stain vectors closer than this (sine of the angle, ~1.1 degrees) cannot be unmixed.
_MIN_STAIN_SINE = 0.02


class StainFitError(ValueError):
    """A slide (or pixel sample) has too little usable tissue to fit stain statistics."""


def _as_rgb_pixels(pixels: np.ndarray, what: str) -> np.ndarray:
    """Return `pixels` as a (N, 3) uint8 view, rejecting anything that is not uint8 RGB."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim < 1 or arr.shape[-1] != 3:
        raise ValueError(
            f"{what} must be uint8 RGB with shape [..., 3], got {arr.dtype} {arr.shape}"
        )
    return arr.reshape(-1, 3)


def _tissue_sample(
    pixels: np.ndarray, io: float, beta: float, max_pixels: int | None, method: str
) -> np.ndarray:
    """The uint8 (K, 3) tissue pixels of `pixels`, at most `max_pixels` (deterministic sample)."""
    flat = _as_rgb_pixels(pixels, "pixels")
    tissue = flat[od_tissue_mask(flat, beta, io)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        raise StainFitError(
            f"cannot fit {method} stain statistics: {len(tissue)} of {len(flat)} pixels are "
            f"tissue (OD >= {beta} in all channels, io={io:g}), need at least "
            f"{MIN_TISSUE_PIXELS}; is this region background?"
        )
    if max_pixels is not None and len(tissue) > max_pixels:
        pick = np.random.default_rng(0).choice(len(tissue), size=max_pixels, replace=False)
        tissue = tissue[np.sort(pick)]
    return tissue


def _fixed_array(values: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A read-only float64 copy of `values` with exactly `shape` and only finite entries."""
    arr = np.array(values, dtype=np.float64)
    if arr.size != math.prod(shape):
        raise ValueError(f"{name} needs {math.prod(shape)} values {shape}, got {arr.size}")
    arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values: {arr.tolist()}")
    arr.flags.writeable = False
    return arr


# --------------------------------------------------------------------------------------------
# Macenko


@dataclass(frozen=True, eq=False)
class MacenkoFit:
    """Per-slide Macenko statistics.

    stain_matrix: (3, 2) unit OD vectors, rows R, G, B and columns [hematoxylin, eosin].
    max_concentrations: (2,) 99th percentile of the H and E concentrations of tissue pixels.
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "stain_matrix", _fixed_array(self.stain_matrix, (3, 2), "stain_matrix")
        )
        maxc = _fixed_array(self.max_concentrations, (2,), "max_concentrations")
        if np.any(maxc <= 0):
            raise ValueError(f"max_concentrations must be positive, got {maxc.tolist()}")
        object.__setattr__(self, "max_concentrations", maxc)

    def to_lists(self) -> dict[str, list[float]]:
        """Plain lists keyed like the `StainFit` protobuf fields (stain_matrix row-major 3x2).

        `pipeline_pb2.StainFit(**fit.to_lists())` builds the message.
        """
        return {
            "stain_matrix": [float(v) for v in self.stain_matrix.ravel()],
            "max_concentrations": [float(v) for v in self.max_concentrations],
        }

    @classmethod
    def from_lists(
        cls, stain_matrix: Sequence[float], max_concentrations: Sequence[float]
    ) -> MacenkoFit:
        """Inverse of `to_lists`; accepts protobuf repeated fields (6 and 2 doubles)."""
        return cls(stain_matrix=list(stain_matrix), max_concentrations=list(max_concentrations))


_LN10 = math.log(10.0)

# The reference (seed) study's H&E reference, from apache/systemds
# projects/breast_cancer/breastcancer/preprocessing.py (`normalize_staining`: `stain_ref`,
# `max_sat_ref`). The study fitted it with SVD on
# OD10 = -log10(I / 255), while this module uses OD = -ln((I + 1) / 240) (docs/architecture.md).
# Unit stain directions do not change when OD is scaled, so the stain matrix is kept as is; the
# concentrations scale with OD, so max_sat_ref is multiplied by ln(10). Beyond that scale the two
# conventions differ by an OD offset of -(ln(255/240) + ln((I+1)/I)) in every channel, about -0.07
# for stained pixels (I of 50 to 200), which this first-order conversion ignores.
SYSTEMML_REFERENCE = MacenkoFit(
    stain_matrix=[
        [0.54598845, 0.322116],
        [0.72385198, 0.76419107],
        [0.42182333, 0.55879629],
    ],
    max_concentrations=[0.82791151 * _LN10, 0.61137274 * _LN10],  # = [1.9063, 1.4077]
)

# Macenko's own reference (ln, io=240), which the study kept commented out; offered for comparison.
MACENKO_2009_REFERENCE = MacenkoFit(
    stain_matrix=[[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
    max_concentrations=[1.9705, 1.0308],
)


def fit_macenko(
    pixels: np.ndarray,
    *,
    io: float = IO,
    alpha: float = 1.0,
    beta: float = BETA,
    max_pixels: int | None = MAX_FIT_PIXELS,
) -> MacenkoFit:
    """Fit Macenko stain vectors and max concentrations to the tissue pixels of `pixels`.

    `pixels` is uint8 RGB of any shape [..., 3], e.g. a sample of a slide's tissue tiles at the
    tiling resolution (a thumbnail gives too low max concentrations; see the module doc). Only
    tissue pixels (OD >= beta in all channels) are used; the stain plane is spanned by the two
    leading eigenvectors of their OD covariance, and the stains are the directions at the alpha
    and 100 - alpha percentiles of the angle in that plane. Hematoxylin is the vector with the
    larger red OD (it absorbs red; eosin absorbs mostly green), so column 0 is H. Deterministic:
    at most `max_pixels` tissue pixels are drawn with a fixed seed.

    Raises StainFitError when there are fewer than MIN_TISSUE_PIXELS tissue pixels or the pixels
    hold a single stain (no plane to unmix).
    """
    tissue = _tissue_sample(pixels, io, beta, max_pixels, "Macenko")
    od = od_lut(io)[tissue]  # (K, 3) float64

    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))  # eigenvalues ascending
    plane = eigvecs[:, [2, 1]]
    # Eigenvector signs are arbitrary: point the main axis into the positive OD octant, and fix
    # the second so the result never depends on the LAPACK build.
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0
    plane[:, 1] *= np.sign(plane[np.argmax(np.abs(plane[:, 1])), 1]) or 1.0

    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [alpha, 100.0 - alpha])
    stains = plane @ np.array([[np.cos(lo), np.cos(hi)], [np.sin(lo), np.sin(hi)]])
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    stains *= np.where(stains.sum(axis=0) < 0, -1.0, 1.0)
    if stains[0, 0] < stains[0, 1]:
        stains = stains[:, ::-1]
    if np.linalg.norm(np.cross(stains[:, 0], stains[:, 1])) < _MIN_STAIN_SINE:
        raise StainFitError(
            f"cannot fit Macenko stain vectors: the {len(od)} tissue pixels span a single stain "
            f"direction (angle spread {math.degrees(hi - lo):.2f} degrees)"
        )

    conc = np.linalg.pinv(stains) @ od.T  # (2, K)
    maxc = np.percentile(conc, 99, axis=1)
    if np.any(maxc <= 1e-6):
        raise StainFitError(
            f"cannot fit Macenko stain vectors: 99th percentile concentrations {maxc.tolist()} "
            "are not positive"
        )
    return MacenkoFit(stain_matrix=stains, max_concentrations=maxc)


class MacenkoNormalizer:
    """Maps tiles stained like `fit` to the stains and saturations of `reference`.

    Unmixing (2x3 pseudo-inverse), rescaling to the reference max concentrations and remixing
    with the reference stain matrix is one linear map of OD, folded here into a 3x3 matrix on
    ln(I + 1) plus a bias, so a tile costs a table look-up, one float32 matmul and one exp (~1.5 ms
    for 256x256 px on one core). Background (OD near 0) stays near white, io - 1 = 239.
    """

    def __init__(
        self, fit: MacenkoFit, reference: MacenkoFit = SYSTEMML_REFERENCE, *, io: float = IO
    ) -> None:
        self.fit = fit
        self.reference = reference
        self.io = io
        self.pinv = np.linalg.pinv(fit.stain_matrix)  # (2, 3): OD -> [H, E] concentrations
        scale = reference.max_concentrations / fit.max_concentrations
        self.od_map = reference.stain_matrix @ (scale[:, None] * self.pinv)  # (3, 3) OD -> OD
        # With y = ln(I + 1) = ln(io) - OD:  y_out = od_map @ y_in + ln(io) * (1 - od_map @ 1).
        self._mt = np.ascontiguousarray(self.od_map.T, dtype=np.float32)
        self._bias = (math.log(io) * (1.0 - self.od_map.sum(axis=1))).astype(np.float32)
        # Intensities brighter than io are clamped to OD 0: glass then maps to a neutral io - 1
        # instead of whatever tint the map gives a negative OD.
        self._log_lut = np.log(np.minimum(np.arange(256, dtype=np.float64) + 1.0, io))
        self._log_lut = self._log_lut.astype(np.float32)

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """Normalize a uint8 RGB tile (any shape [..., 3]); returns uint8 of the same shape."""
        flat = _as_rgb_pixels(tile, "tile")
        y = np.take(self._log_lut, flat) @ self._mt
        y += self._bias
        np.exp(y, out=y)  # = I_out + 1
        y -= 0.5  # round to nearest by truncation below
        np.clip(y, 0.0, 255.0, out=y)
        return y.astype(np.uint8).reshape(np.shape(tile))


# --------------------------------------------------------------------------------------------
# Reinhard (CIELAB, D65, 2 degree observer: the same Lab as skimage.color.rgb2lab)

_XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_T_FROM_RGB = _XYZ_FROM_RGB / _WHITE_D65[:, None]  # linear RGB -> XYZ / white
_RGB_FROM_T = np.linalg.inv(_T_FROM_RGB)
# Lab = _LAB_FROM_F @ (fx, fy, fz) + _LAB_OFFSET
_LAB_FROM_F = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB_OFFSET = np.array([-16.0, 0.0, 0.0])
_F_FROM_LAB = np.linalg.inv(_LAB_FROM_F)
_T_EPS = 0.008856  # below this t, f(t) is linear: 7.787 t + 16/116
_F_EPS = 7.787 * _T_EPS + 16.0 / 116.0
_GAMMA_STEPS = 65535  # resolution of the linear-RGB -> sRGB uint8 table


def _srgb_to_linear_lut() -> np.ndarray:
    c = np.arange(256, dtype=np.float64) / 255.0
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


_LINEAR_LUT64 = _srgb_to_linear_lut()
_LINEAR_LUT32 = _LINEAR_LUT64.astype(np.float32)


def _linear_to_srgb_u8_lut() -> np.ndarray:
    lin = np.arange(_GAMMA_STEPS + 1, dtype=np.float64) / _GAMMA_STEPS
    c = np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8)


_SRGB_U8_LUT = _linear_to_srgb_u8_lut()


def _f_of_t(t: np.ndarray) -> np.ndarray:
    """Lab's companding f(t) of t = X/Xn, Y/Yn or Z/Zn (cube root, linear near black)."""
    return np.where(t > _T_EPS, np.cbrt(np.maximum(t, _T_EPS)), 7.787 * t + 16.0 / 116.0)


# f over t in [0, 1] (the range for sRGB input) at 1/65535 steps: a table look-up is ~10x faster
# than np.cbrt, and as f' <= 7.8 above _T_EPS the nearest entry is off by < 0.01 in L.
_F_STEPS = 65535
_F_LUT32 = _f_of_t(np.arange(_F_STEPS + 1, dtype=np.float64) / _F_STEPS).astype(np.float32)


def _lab(flat: np.ndarray) -> np.ndarray:
    """CIELAB (float64) of uint8 (N, 3) sRGB pixels; matches skimage.color.rgb2lab."""
    t = _LINEAR_LUT64[flat] @ _T_FROM_RGB.T
    return _f_of_t(t) @ _LAB_FROM_F.T + _LAB_OFFSET


@dataclass(frozen=True, eq=False)
class ReinhardFit:
    """Per-slide CIELAB statistics of tissue pixels: lab_mean (3,) and lab_std (3,) for L, a, b."""

    lab_mean: np.ndarray
    lab_std: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "lab_mean", _fixed_array(self.lab_mean, (3,), "lab_mean"))
        std = _fixed_array(self.lab_std, (3,), "lab_std")
        if np.any(std <= 0):
            raise ValueError(f"lab_std must be positive, got {std.tolist()}")
        object.__setattr__(self, "lab_std", std)

    def to_lists(self) -> dict[str, list[float]]:
        """Plain lists keyed like the `StainFit` protobuf fields: `StainFit(**fit.to_lists())`."""
        return {
            "lab_mean": [float(v) for v in self.lab_mean],
            "lab_std": [float(v) for v in self.lab_std],
        }

    @classmethod
    def from_lists(cls, lab_mean: Sequence[float], lab_std: Sequence[float]) -> ReinhardFit:
        """Inverse of `to_lists`; accepts protobuf repeated fields (3 and 3 doubles)."""
        return cls(lab_mean=list(lab_mean), lab_std=list(lab_std))


# Target H&E appearance: fit_reinhard (defaults) on the whole of cmu-1-small-region.svs, level 0
# (OpenSlide's public CMU-1 H&E test slide, 2220 x 2967 px; a well-stained Aperio 20x scan), rounded
# to 4 decimals. tests/unit/test_stain.py checks that the fit reproduces these numbers.
REINHARD_REFERENCE = ReinhardFit(
    lab_mean=[41.8505, 29.2119, -14.4567], lab_std=[16.1266, 11.9232, 9.1811]
)


def fit_reinhard(
    pixels: np.ndarray,
    *,
    io: float = IO,
    beta: float = BETA,
    max_pixels: int | None = MAX_FIT_PIXELS,
) -> ReinhardFit:
    """CIELAB mean and standard deviation of the tissue pixels (OD >= beta) of `pixels`.

    Background is left out so that the share of white glass in a slide does not shift the
    statistics. Raises StainFitError with fewer than MIN_TISSUE_PIXELS tissue pixels.
    """
    lab = _lab(_tissue_sample(pixels, io, beta, max_pixels, "Reinhard"))
    std = lab.std(axis=0)
    if np.any(std <= 1e-6):
        raise StainFitError(f"cannot fit Reinhard statistics: tissue is flat, LAB std {std}")
    return ReinhardFit(lab_mean=lab.mean(axis=0), lab_std=std)


class ReinhardNormalizer:
    """Matches each CIELAB channel's tissue mean and std of a slide (`fit`) to `target`.

    The statistics describe tissue only, so applying the map to glass extrapolates it (pale TCGA
    glass turned cyan). With `protect_background` (default) each pixel is blended between the
    mapped and its own colour with weight clip(min-channel OD / beta, 0, 1): tissue pixels (OD >=
    beta) are fully mapped, glass (OD <= 0) is left as it is.

    The per-channel affine map in Lab is affine in Lab's f-space too, so it is folded into one
    3x3 matrix plus bias there; the sRGB decoding and encoding are table look-ups. A tile costs
    three small matmuls, a cube and four table look-ups in float32 (~3 ms for 256x256 px on one
    core).
    """

    def __init__(
        self,
        fit: ReinhardFit,
        target: ReinhardFit = REINHARD_REFERENCE,
        *,
        protect_background: bool = True,
        io: float = IO,
        beta: float = BETA,
    ) -> None:
        self.fit = fit
        self.target = target
        self.protect_background = protect_background
        # Blend weight of a pixel, looked up by its brightest channel (= its smallest OD).
        self._weight_lut = np.clip(od_lut(io) / beta, 0.0, 1.0).astype(np.float32)
        gain = target.lab_std / fit.lab_std
        shift = target.lab_mean - gain * fit.lab_mean
        # Lab' = gain * Lab + shift, Lab = A f + o  =>  f' = A^-1 diag(gain) A f + A^-1 (gain o
        # + shift - o).
        f_map = _F_FROM_LAB @ (gain[:, None] * _LAB_FROM_F)
        f_bias = _F_FROM_LAB @ (gain * _LAB_OFFSET + shift - _LAB_OFFSET)
        # Scaled so that t lands directly on _F_LUT32 indices.
        self._t_map = np.ascontiguousarray(_T_FROM_RGB.T * _F_STEPS, dtype=np.float32)
        self._f_map = np.ascontiguousarray(f_map.T, dtype=np.float32)
        self._f_bias = f_bias.astype(np.float32)
        # Scaled so that linear RGB lands directly on _SRGB_U8_LUT indices.
        self._rgb_map = np.ascontiguousarray(_RGB_FROM_T.T * _GAMMA_STEPS, dtype=np.float32)

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """Normalize a uint8 RGB tile (any shape [..., 3]); returns uint8 of the same shape."""
        flat = _as_rgb_pixels(tile, "tile")
        t_idx = np.take(_LINEAR_LUT32, flat) @ self._t_map
        t_idx += 0.5  # nearest table entry by truncation below
        np.clip(t_idx, 0.0, _F_STEPS, out=t_idx)
        f_in = np.take(_F_LUT32, t_idx.astype(np.int32))
        f = f_in @ self._f_map
        f += self._f_bias
        if self.protect_background:
            brightest = np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])
            f -= f_in
            f *= np.take(self._weight_lut, brightest)[:, None]
            f += f_in
        low = f <= _F_EPS
        t = f * f
        t *= f
        if low.any():
            t[low] = (f[low] - 16.0 / 116.0) / 7.787
        lin = t @ self._rgb_map
        lin += 0.5  # round to the nearest table entry by truncation below
        np.clip(lin, 0.0, _GAMMA_STEPS, out=lin)
        return np.take(_SRGB_U8_LUT, lin.astype(np.int32)).reshape(np.shape(tile))
