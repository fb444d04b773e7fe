"""The two models' serving contract: names, tensors, geometry and the preprocessing that
training and the serving signature share (docs/architecture.md, "Models").

Training builds the Keras models here and hands them to `export_model`, which writes the
TensorFlow Serving layout `MODEL_ROOT/<name>/<version>/saved_model.pb` (+ `variables/`) with one
`serving_default` signature:

- input `tiles`: uint8 `[N, H, W, 3]` RGB tiles of any size. The signature does its own
  preprocessing (cast, resize, normalisation), so clients send 4x smaller requests than float32
  and training and serving cannot disagree on it (training calls the same `preprocess_*`).
- tumor (`resnet50`): output `probabilities` float32 `[N, classes]` (softmax, sums to 1); when
  the model has the molecular head (trained when the labels carried TUPAC16 molecular scores)
  also `molecular_score` float32 `[N]`, one value per tile. Without the head the signature has
  `probabilities` only, as before.
- mitosis (`mitosis`): output `mitosis_map` float32 `[N, ceil(H/8), ceil(W/8)]`; map cell
  `(i, j)` is centred on tile pixel `(8*i + 3.5, 8*j + 3.5)` and sees about 66 px around it.

Each version also carries `assets.extra/prolifscore.json` (`METADATA_FILE`), which TF Serving
ignores and our clients read: `kind`, `model`, `version`, `trained` (false: random
initialisation, never to be shown as a result), `input_size`, `classes`, `outputs` (name ->
description), the detector's `threshold`, and for the tumor model:

- `score_rule`, how the slide class follows from the tiles' mean probabilities p (normalised
  to sum to 1) by default. `index` is the proliferation index, the expected score
  sum_k k * p_k over k = 1..3 (continuous, what task 2's Spearman ranks). `default` is
  "cutpoints" when `cutpoints` = [c1, c2] (ascending) were fitted, else "argmax". With cut
  points: class = 1 + (index >= c1) + (index >= c2); `fitted_on` is "training slides"
  (`slides` of them, at most `tiles_per_slide` evenly strided tiles each, null = all), with the
  `train_kappa` / `val_kappa` they gave. Example:
  `{"default": "cutpoints", "cutpoints": [1.42, 1.87], "index": "expected score sum_k k * p_k,
  ...", "decision": "score = 1 + (index >= cutpoints[0]) + (index >= cutpoints[1])",
  "fitted_on": "training slides", "slides": 78, "tiles_per_slide": 64, ...}`.
  The scoring service calls `core.grading.evaluation.slide_decision(mean_probs, tile_classes,
  rule, score_rule["cutpoints"])` -> (class, rule applied, index) for the request's ScoreRule
  (unspecified: the model's default). Exports older than `score_rule` carry the same cut points
  as `slide_cutpoints` (same meaning); with neither, the rule is argmax.
- `molecular_head`: null (or absent) when the signature has no `molecular_score`; else
  `{"output": "molecular_score", "trained": bool, "slide_value": "mean of tiles",
  "target_mean", "target_std", "val_spearman", "val_slides"}`. A slide's molecular score is the
  mean of its tiles' `molecular_score`; only a `trained` head's value is a result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # TensorFlow takes seconds to import: only the functions that need it do.
    import numpy as np
    import tensorflow as tf

TUMOR_MODEL = "resnet50"
MITOSIS_MODEL = "mitosis"
SIGNATURE = "serving_default"
INPUT = "tiles"
TUMOR_OUTPUT = "probabilities"
TUMOR_MOLECULAR_OUTPUT = "molecular_score"
MITOSIS_OUTPUT = "mitosis_map"
METADATA_FILE = "assets.extra/prolifscore.json"

Kind = Literal["tumor", "mitosis"]
DEFAULT_NAMES: dict[str, str] = {"tumor": TUMOR_MODEL, "mitosis": MITOSIS_MODEL}

# ResNet50 "caffe" preprocessing (keras.applications.resnet50.preprocess_input): BGR order,
# ImageNet channel means subtracted, no scaling.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# Mitosis detector geometry: three 2x2 max-pools -> stride 8; pool cells start at pixel 0, so
# cell i covers pixels [8i, 8i + 8) and is centred on 8i + 3.5.
MITOSIS_STRIDE = 8
MITOSIS_OFFSET = 3.5
MITOSIS_RECEPTIVE_FIELD = 66
MITOSIS_PATCH = 64


# --------------------------------------------------------------------------------------------
# Preprocessing shared by training and the serving signature.


def preprocess_tumor(tiles: tf.Tensor | np.ndarray, input_size: int) -> tf.Tensor:
    """uint8 (or 0-255 float) RGB `[N,H,W,3]` -> ResNet50 input `[N,s,s,3]` float32.

    Bilinear resize with antialiasing (256 px tiles -> 224) only when the size differs, then
    the ResNet50 caffe normalisation. Training must feed tiles through this same function.
    """
    import tensorflow as tf

    x = tf.cast(tiles, tf.float32)
    shape = tf.shape(x)
    x = tf.cond(
        tf.logical_and(tf.equal(shape[1], input_size), tf.equal(shape[2], input_size)),
        lambda: x,
        lambda: tf.image.resize(x, (input_size, input_size), antialias=True),
    )
    return x[..., ::-1] - tf.constant(_CAFFE_BGR_MEAN, tf.float32)


def preprocess_mitosis(tiles: tf.Tensor | np.ndarray) -> tf.Tensor:
    """uint8 (or 0-255 float) RGB -> float32 in [0, 1]; any size (the detector is convolutional)."""
    import tensorflow as tf

    return tf.cast(tiles, tf.float32) / 255.0
