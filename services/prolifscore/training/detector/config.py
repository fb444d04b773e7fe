"""The detector's training settings (`MitosisTrainConfig`), stored in the export metadata."""

from __future__ import annotations

from dataclasses import dataclass

from prolifscore.core.grading.matching import match_radius_px
from prolifscore.training.detector.regions import TARGET_MPP


@dataclass(frozen=True)
class MitosisTrainConfig:
    """Detector training settings; sizes in pixels at `mpp` unless named in um.

    Defaults are the settings measured on the synthetic benchmark (`bench.validation`): held-out
    F1 0.83 (119 held-out mitoses) in 6 minutes on 2 loaded cores; 6 epochs and 4 copies gave
    0.75 (recall 0.67). Real TUPAC16 data is harder; expect to need more
    epochs and `width=16` (the architecture's default) there.
    """

    epochs: int = 10  # before the first hard-negative round
    batch_size: int = 64
    learning_rate: float = 4e-3  # Adam, cosine-decayed over all epochs (hard rounds included)
    final_lr_fraction: float = 0.05
    width: int = 8  # build_mitosis_model width; 8 trains ~2x faster than 16 on CPU
    positive_copies: int = 6  # shifted/rotated copies per mitosis per epoch
    max_shift_px: float = 4.0  # half a map cell: the nearest cell must fire
    negatives_per_region: int = 16  # per epoch, regions without mitoses included
    dark_negative_share: float = 0.75  # of those at dark blobs (nuclei), the rest anywhere
    positive_share: float = 0.3  # positives' share of the loss weight
    hard_negative_rounds: int = 2
    hard_negative_epochs: int = 3  # epochs after each mining round
    hard_negative_threshold: float = 0.3  # detections above this that match nothing are mined
    hard_negatives_per_region: int = 12  # per round, at most, the most confident first
    hard_negative_copies: int = 1
    # Keras' default 0.99 leaves the inference statistics mostly at their initial values
    # after a few hundred steps: the patch loss falls while full-region maps stay flat.
    bn_momentum: float = 0.9
    colour_jitter: float = 0.06  # per-channel gain range (stain variation)
    jpeg_probability: float = 0.5  # of a JPEG (4:2:0) round trip per patch
    jpeg_quality_range: tuple[int, int] = (70, 95)
    val_fraction: float = 0.2
    seed: int = 0
    threshold: float | None = None  # None: the best F1 on the training cases
    nms_radius_um: float = 8.0  # as MitosisGrading
    mpp: float = TARGET_MPP
    data_mpp: float | None = None  # files' mpp: None = dataset.json, else 0.25 (TUPAC aux)
    eval_every_epoch: bool = True  # held-out F1 at 0.5 in the history (one detector pass)

    @property
    def match_radius_px(self) -> float:
        return match_radius_px(self.mpp)

    @property
    def nms_radius_px(self) -> float:
        return self.nms_radius_um / self.mpp
