"""The TUPAC16 auxiliary mitosis data set: `<case>/<region>.tif` region images with
`<case>/<region>.csv` `row,col` centroids, read, validated and brought to the training
resolution, and split by case."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from prolifscore.core.grading.submission import IMAGE_SUFFIXES, EvaluationError, read_points
from prolifscore.core.models.contract import MITOSIS_PATCH
from prolifscore.core.wsi.tissue import od_tissue_mask

TARGET_MPP = 0.5
TUPAC_AUX_MPP = 0.25  # the real auxiliary mitosis set is scanned at 40x
MPP_TOLERANCE = 0.02
REGION_PAD = MITOSIS_PATCH  # reflect padding so patches at region borders can be cut


class DatasetError(ValueError):
    """The mitosis data set cannot be trained on; raised before any training starts."""


@dataclass
class Region:
    """One region at the training resolution: image and (row, col) mitosis centroids."""

    case: str
    name: str
    image: np.ndarray  # uint8 [H, W, 3]
    centroids: np.ndarray  # float64 [n, 2] (row, col)
    # Caches; init=False so that dataclasses.replace() (e.g. new centroids) starts afresh.
    _padded: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _candidates: dict[float, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def padded(self) -> np.ndarray:
        if self._padded is None:
            p = REGION_PAD
            self._padded = np.pad(self.image, ((p, p), (p, p), (0, 0)), mode="reflect")
        return self._padded

    def negative_candidates(self, exclude_px: float) -> tuple[np.ndarray, np.ndarray]:
        """(tissue pixels, dark-blob pixels), each [n, 2], farther than `exclude_px` from
        every mitosis. Dark blobs are local minima of smoothed brightness: nuclei, mimics."""
        if exclude_px not in self._candidates:
            gray = self.image.astype(np.float32).mean(axis=2)
            smooth = ndi.gaussian_filter(gray, 2.0)
            tissue = od_tissue_mask(self.image)
            minima = (smooth == ndi.minimum_filter(smooth, size=9)) & tissue
            minima &= smooth <= np.percentile(smooth, 30)
            far = np.ones(gray.shape, bool)
            if len(self.centroids):
                seeds = np.zeros(gray.shape, bool)
                rc = np.clip(np.rint(self.centroids).astype(int), 0, np.array(gray.shape) - 1)
                seeds[rc[:, 0], rc[:, 1]] = True
                far = ndi.distance_transform_edt(~seeds) > exclude_px
            t = np.argwhere(tissue & far)
            if len(t) == 0:
                t = np.argwhere(far)
            self._candidates[exclude_px] = (t, np.argwhere(minima & far))
        return self._candidates[exclude_px]


@dataclass
class MitosisDataset:
    root: Path
    mpp: float  # of the files
    target_mpp: float
    regions: list[Region]
    fingerprint: str
    synthetic: bool = False

    @property
    def cases(self) -> list[str]:
        return sorted({r.case for r in self.regions})

    def split(self, val_fraction: float, seed: int) -> tuple[list[Region], list[Region]]:
        """Case-level split: (training regions, held-out regions), fixed by `seed`."""
        cases = self.cases
        if len(cases) < 2:
            raise DatasetError(
                f"{self.root}: {len(cases)} case(s); a case-level split needs at least 2"
            )
        n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
        order = np.random.default_rng(seed).permutation(len(cases))
        held = {cases[i] for i in order[:n_val]}
        return (
            [r for r in self.regions if r.case not in held],
            [r for r in self.regions if r.case in held],
        )


def read_centroids(path: Path) -> np.ndarray:
    """`row,col` lines (TUPAC16: integers, no header), `[n, 2]`; a `row,col` header line is
    tolerated. Anything else is a DatasetError naming the file and line (the same reader as
    `prolifscore evaluate`'s ground truth)."""
    try:
        return read_points(path)
    except EvaluationError as exc:
        raise DatasetError(str(exc)) from None


def _read_image(path: Path) -> np.ndarray:
    import tifffile

    try:
        image = tifffile.imread(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, OSError, ...
        raise DatasetError(f"cannot read region image {path}: {exc}") from exc
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise DatasetError(
            f"{path}: expected an 8-bit RGB image, got shape {image.shape} {image.dtype}"
        )
    if min(image.shape[:2]) < MITOSIS_PATCH:
        raise DatasetError(f"{path}: region smaller than {MITOSIS_PATCH} px")
    return np.ascontiguousarray(image[..., :3])


def _rescale(image: np.ndarray, pts: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize by `factor` (box filter when shrinking) and map centroids to the new pixels."""
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    resample = Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR
    out = np.asarray(Image.fromarray(image).resize((nw, nh), resample))
    scale = np.array([nh / h, nw / w])
    return out, (pts + 0.5) * scale - 0.5


def _fingerprint(root: Path, files: Sequence[Path]) -> str:
    """Hash of the data set's file names and sizes: identifies it in the export metadata."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def read_mitosis_dataset(
    data_dir: Path | str,
    *,
    mpp: float | None = None,
    target_mpp: float = TARGET_MPP,
    labels_dir: Path | str | None = None,
) -> MitosisDataset:
    """Read and validate a whole auxiliary-layout data set, rescaled to `target_mpp`.

    `mpp` of the files: given, else `dataset.json`'s, else 0.25 (the real TUPAC16 auxiliary
    set). `labels_dir`: where `<case>/<region>.csv` live when not beside the images (the
    challenge ships them as a separate ground-truth folder). Every image is decoded here, so a
    bad file fails before training, not an hour into it.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"mitosis data set {root} does not exist or is not a folder")
    labels = Path(labels_dir) if labels_dir else root
    meta: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        try:
            meta = json.loads((root / "dataset.json").read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{root / 'dataset.json'}: {exc}") from exc
    file_mpp = float(mpp or meta.get("mpp") or TUPAC_AUX_MPP)
    if file_mpp <= 0 or target_mpp <= 0:
        raise DatasetError(f"mpp must be positive (files {file_mpp}, target {target_mpp})")
    images = sorted(
        p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not images:
        raise DatasetError(f"{root}: no region images (<case>/<region>.tif) found")
    stems = {(p.parent.name, p.stem) for p in images}
    orphans = [p for p in sorted(labels.glob("*/*.csv")) if (p.parent.name, p.stem) not in stems]
    if orphans:
        raise DatasetError(f"label file(s) without a region image: {orphans[:3]}")
    factor = file_mpp / target_mpp
    regions: list[Region] = []
    used: list[Path] = []
    for path in images:
        image = _read_image(path)
        csv_path = labels / path.parent.name / f"{path.stem}.csv"
        pts = read_centroids(csv_path) if csv_path.is_file() else np.zeros((0, 2))
        h, w = image.shape[:2]
        outside = (pts[:, 0] < 0) | (pts[:, 0] >= h) | (pts[:, 1] < 0) | (pts[:, 1] >= w)
        if outside.any():
            raise DatasetError(
                f"{csv_path}: centroid {pts[outside][0].tolist()} outside the {h}x{w} image "
                "(rows and columns swapped, or labels of another resolution?)"
            )
        if abs(factor - 1.0) > MPP_TOLERANCE:
            image, pts = _rescale(image, pts, factor)
        regions.append(Region(path.parent.name, path.stem, image, pts))
        used.append(path)
        if csv_path.is_file():
            used.append(csv_path)
    return MitosisDataset(
        root=root,
        mpp=file_mpp,
        target_mpp=target_mpp,
        regions=regions,
        fingerprint=_fingerprint(root, [u for u in used if u.is_relative_to(root)]),
        synthetic=bool(meta.get("synthetic", False)),
    )
