"""The Keras models: ResNet50 tumor-score model and the fully convolutional mitosis detector,
with the start-weights rules (never a download)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prolifscore.core.models.contract import MITOSIS_PATCH, MITOSIS_STRIDE

if TYPE_CHECKING:
    import keras

IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


class WeightsError(ValueError):
    """The requested weights cannot be used (missing, wrong shape, or not available offline)."""


def _keras_cache_file(filename: str) -> Path:
    """Where `keras.utils.get_file` would have cached a download (KERAS_HOME or ~/.keras)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / filename


def random_init(weights: str) -> bool:
    """Whether the `weights` setting asks for random initialisation (no file to load)."""
    return str(weights).strip().lower() in ("", "none", "random")


def _resolve_weights(weights: str) -> Path | None:
    """Turn the `weights` setting into a file to load (None = random init), failing fast."""
    if random_init(weights):
        return None
    spec = str(weights).strip()
    if spec.lower() == "imagenet":
        cached = _keras_cache_file(IMAGENET_NOTOP_FILE)
        if cached.is_file():
            return cached
        raise WeightsError(
            "ImageNet weights for ResNet50 are not available offline and no download is "
            f"attempted: {cached} does not exist. Fetch {IMAGENET_NOTOP_FILE} on a connected "
            "machine and pass its path as weights=/path/to/file.h5 (or place it at that cache "
            "path), or use weights='none' for random initialisation."
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist (expected 'none', 'imagenet' "
            "or the path of a Keras weights file)"
        )
    return path


def build_tumor_model(
    input_size: int = 224,
    weights: str = "none",
    classes: int = 3,
    molecular: tuple[float, float] | None = None,
) -> keras.Model:
    """Keras ResNet50 backbone (global average pooling) + dropout + softmax head.

    `weights`: "none" (random init), "imagenet" (only from the local Keras cache: never
    downloads), or a weights file: a full-model file (our checkpoints) or a backbone-only
    file such as Keras' ImageNet "notop" h5. A file that does not fit raises `WeightsError`
    here, before any training time is spent. The model expects `preprocess_tumor` output.

    `molecular` = (mean, std) of the training slides' molecular scores adds the TUPAC16 task 2
    regression head beside the class head: the model then returns a dict {"tumor_score":
    probabilities, "molecular_score": [N, 1]}. The head predicts in standardised units and a
    fixed rescaling returns the score's own units, so one loss weight suits any score range.
    Without it the model is exactly the single-output model (same layers, same weights file).
    """
    weights_file = _resolve_weights(weights)  # fail fast, before building anything
    if input_size < 32:
        raise ValueError(f"input_size must be >= 32 for ResNet50, got {input_size}")
    import keras

    backbone = keras.applications.ResNet50(
        include_top=False,
        weights=None,
        input_shape=(input_size, input_size, 3),
        pooling="avg",
        name="resnet50",
    )
    inputs = keras.Input((input_size, input_size, 3), name="image")
    features = backbone(inputs)
    features = keras.layers.Dropout(0.5, name="dropout")(features)
    outputs = keras.layers.Dense(classes, activation="softmax", name="tumor_score")(features)
    if molecular is None:
        model = keras.Model(inputs, outputs, name="tumor")
    else:
        mean, std = molecular
        if not std > 0:
            raise ValueError(f"molecular score std must be positive, got {std}")
        standardised = keras.layers.Dense(1, name="molecular_head")(features)
        value = keras.layers.Rescaling(std, offset=mean, name="molecular_score")(standardised)
        model = keras.Model(
            inputs, {"tumor_score": outputs, "molecular_score": value}, name="tumor"
        )
    if weights_file is not None:
        head = ", molecular head" if molecular else ""
        _load_weights(
            model, backbone, weights_file, f"{input_size} px ResNet50, {classes} classes{head}"
        )
    return model


def tumor_outputs(outputs: Any) -> tuple[Any, Any | None]:
    """(class probabilities, molecular scores [N] or None) of a tumor model's call, whichever
    head layout it has."""
    if isinstance(outputs, dict):
        molecular = outputs.get("molecular_score")
        flat = None if molecular is None else molecular[..., 0]
        return outputs["tumor_score"], flat
    return outputs, None


def _load_weights(model: keras.Model, backbone: keras.Model, path: Path, what: str) -> None:
    """Full-model file first, then backbone-only; neither fitting is a WeightsError."""
    errors = []
    for target, label in ((model, "full model"), (backbone, "backbone")):
        try:
            _quiet_load(target, path)
            return
        except Exception as exc:  # Keras raises ValueError / KeyError / OSError variously
            errors.append(f"as {label}: {_short(exc)}")
    raise WeightsError(f"weights file {path} does not fit the {what}: " + " | ".join(errors))


def _quiet_load(model: keras.Model, path: Path) -> None:
    """load_weights without Keras' per-layer warnings (a failed attempt emits hundreds)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_weights(str(path))


def _short(exc: Exception) -> str:
    """Keras' load errors embed whole variable values: keep the part that names the shapes."""
    text = " ".join(str(exc).split()).split(" Target variable:")[0]
    return f"{type(exc).__name__}: {text[:400]}"


def build_mitosis_model(width: int = 16, weights: str = "none") -> keras.Model:
    """Small fully convolutional mitosis detector: `[N,H,W,3]` in [0,1] -> `[N,H/8,W/8,1]`.

    Four conv/BN/ReLU stages separated by 2x2 max-pools (total stride 8, receptive field
    66 px at 20x, about the 64 px patches TUPAC mitosis training uses), then a 1x1 conv +
    sigmoid: trained on 64 px patches through `mitosis_patch_model`, the same weights give a
    probability map on whole tiles. ~0.6 GMAC per 256 px tile, a seventh of ResNet50.
    `weights`: "none" or a weights file of this architecture (a mismatch is a WeightsError).
    """
    if str(weights).strip().lower() == "imagenet":
        raise WeightsError("the mitosis detector has no ImageNet weights; use 'none' or a path")
    weights_file = _resolve_weights(weights)
    import keras
    from keras import layers

    def block(x: Any, filters: int, convs: int, stage: int) -> Any:
        for k in range(convs):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"c{stage}{k}")(x)
            x = layers.BatchNormalization(name=f"bn{stage}{k}")(x)
            x = layers.ReLU(name=f"relu{stage}{k}")(x)
        return x

    inputs = keras.Input((None, None, 3), name="image")
    x = block(inputs, width, 1, 1)
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = block(x, 2 * width, 2, 2)
    x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = block(x, 4 * width, 2, 3)
    x = layers.MaxPooling2D(2, padding="same", name="pool3")(x)
    x = block(x, 4 * width, 2, 4)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mitosis")(x)
    model = keras.Model(inputs, outputs, name="mitosis_fcn")
    if weights_file is not None:
        try:
            _quiet_load(model, weights_file)
        except Exception as exc:
            raise WeightsError(
                f"weights file {weights_file} does not fit the mitosis detector "
                f"(width {width}): {_short(exc)}"
            ) from exc
    return model


def mitosis_patch_model(detector: keras.Model, patch_size: int = MITOSIS_PATCH) -> keras.Model:
    """Training view of the detector: a patch -> probability that a mitosis sits at its centre.

    Reads the map at the patch centre (not a max over the patch) so that training teaches
    localisation: the map value at a tile position then means "a mitosis is centred here".
    For a 64 px patch the 8x8 map's centre (pixel 31.5) lies between cells 3 and 4, so the
    readout is the mean of the central 2x2 cells (one cell when the map side is odd).
    Shares its weights with `detector`, which is what gets exported.
    """
    import keras
    from keras import ops

    side = math.ceil(patch_size / MITOSIS_STRIDE)
    lo, hi = (side // 2 - 1, side // 2 + 1) if side % 2 == 0 else (side // 2, side // 2 + 1)
    inputs = keras.Input((patch_size, patch_size, 3), name="patch")
    heat = detector(inputs)
    centre = ops.mean(heat[:, lo:hi, lo:hi, :], axis=(1, 2))
    return keras.Model(inputs, centre, name="mitosis_patch")
