"""The two models and their serving contract (DESIGN.md section 4).

Training builds the Keras models here and hands them to `export_model`, which writes the
TensorFlow Serving layout `MODEL_ROOT/<name>/<version>/saved_model.pb` (+ `variables/`) with one
`serving_default` signature:

- input `tiles`: uint8 `[N, H, W, 3]` RGB tiles of any size. The signature does its own
  preprocessing (cast, resize, normalisation), so clients send 4x smaller requests than float32
  and training and serving cannot disagree on it (training calls the same `preprocess_*`).
- tumor (`resnet50`): output `probabilities` float32 `[N, classes]` (softmax, sums to 1).
- mitosis (`mitosis`): output `mitosis_map` float32 `[N, ceil(H/8), ceil(W/8)]`; map cell
  `(i, j)` is centred on tile pixel `(8*i + 3.5, 8*j + 3.5)` and sees about 66 px around it.

Each version also carries `assets.extra/prolifscore.json` (kind, sizes, stride, `trained`, ...),
which TF Serving ignores and our clients read to refuse untrained models as results.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # TensorFlow takes seconds to import: only the functions that need it do.
    import keras
    import numpy as np
    import tensorflow as tf

TUMOR_MODEL = "resnet50"
MITOSIS_MODEL = "mitosis"
SIGNATURE = "serving_default"
INPUT = "tiles"
TUMOR_OUTPUT = "probabilities"
MITOSIS_OUTPUT = "mitosis_map"
METADATA_FILE = "assets.extra/prolifscore.json"

Kind = Literal["tumor", "mitosis"]
DEFAULT_NAMES: dict[str, str] = {"tumor": TUMOR_MODEL, "mitosis": MITOSIS_MODEL}

# ResNet50 "caffe" preprocessing (keras.applications.resnet50.preprocess_input): BGR order,
# ImageNet channel means subtracted, no scaling.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"

# Mitosis detector geometry: three 2x2 max-pools -> stride 8; pool cells start at pixel 0, so
# cell i covers pixels [8i, 8i + 8) and is centred on 8i + 3.5.
MITOSIS_STRIDE = 8
MITOSIS_OFFSET = 3.5
MITOSIS_RECEPTIVE_FIELD = 66
MITOSIS_PATCH = 64


class WeightsError(ValueError):
    """The requested weights cannot be used (missing, wrong shape, or not available offline)."""


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


# --------------------------------------------------------------------------------------------
# Model builders.


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
    input_size: int = 224, weights: str = "none", classes: int = 3
) -> keras.Model:
    """Keras ResNet50 backbone (global average pooling) + dropout + softmax head.

    `weights`: "none" (random init), "imagenet" (only from the local Keras cache: never
    downloads), or a weights file: a full-model file (our checkpoints) or a backbone-only
    file such as Keras' ImageNet "notop" h5. A file that does not fit raises `WeightsError`
    here, before any training time is spent. The model expects `preprocess_tumor` output.
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
    model = keras.Model(inputs, outputs, name="tumor")
    if weights_file is not None:
        _load_weights(model, backbone, weights_file, f"{input_size} px ResNet50, {classes} classes")
    return model


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


# --------------------------------------------------------------------------------------------
# Export in TF Serving layout.


def _version_dirs(model_dir: Path) -> list[int]:
    """Every integer-named folder (complete or not): new versions must not collide with any."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def list_versions(model_root: Path | str, name: str) -> list[int]:
    """Complete versions of model `name` (integer folders holding saved_model.pb), ascending."""
    model_dir = Path(model_root) / name
    return [
        v for v in _version_dirs(model_dir) if (model_dir / str(v) / "saved_model.pb").is_file()
    ]


def read_metadata(version_dir: Path | str) -> dict[str, Any]:
    """Our metadata of an exported version; {} for SavedModels exported elsewhere."""
    path = Path(version_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _serving_function(model: keras.Model, kind: Kind) -> tuple[Any, dict[str, Any]]:
    """The `serving_default` tf.function and the metadata describing its contract."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT)
    if kind == "tumor":
        input_size = int(model.input_shape[1])
        classes = int(model.output_shape[-1])

        @tf.function(input_signature=[spec])
        def serve_tumor(tiles: tf.Tensor) -> dict[str, tf.Tensor]:
            probs = model(preprocess_tumor(tiles, input_size), training=False)
            return {TUMOR_OUTPUT: tf.cast(probs, tf.float32)}

        return serve_tumor, {
            "input_size": input_size,
            "classes": classes,
            "preprocessing": "bilinear antialiased resize to input_size, ResNet50 caffe",
            "outputs": {TUMOR_OUTPUT: f"float32 [N, {classes}] softmax"},
        }
    if kind == "mitosis":
        if tuple(model.input_shape[1:3]) != (None, None):
            raise ValueError("the mitosis model must be fully convolutional (input [N,?,?,3])")

        @tf.function(input_signature=[spec])
        def serve_mitosis(tiles: tf.Tensor) -> dict[str, tf.Tensor]:
            heat = model(preprocess_mitosis(tiles), training=False)
            return {MITOSIS_OUTPUT: tf.cast(heat[..., 0], tf.float32)}

        return serve_mitosis, {
            "input_size": MITOSIS_PATCH,
            "patch_size": MITOSIS_PATCH,
            "stride": MITOSIS_STRIDE,
            "offset": MITOSIS_OFFSET,
            "receptive_field": MITOSIS_RECEPTIVE_FIELD,
            "patch_readout": "mean of the central 2x2 map cells",
            "preprocessing": "x / 255",
            "outputs": {MITOSIS_OUTPUT: "float32 [N, ceil(H/8), ceil(W/8)] sigmoid"},
        }
    raise ValueError(f"kind must be 'tumor' or 'mitosis', got {kind!r}")


def export_model(
    model: keras.Model,
    kind: Kind,
    model_root: Path | str,
    *,
    name: str | None = None,
    version: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as `model_root/<name>/<version>/` (TF Serving layout); returns that folder.

    `version` defaults to one above every existing integer folder. The SavedModel is written
    to a hidden sibling and renamed into place, so a server polling the root (ours or TF
    Serving, which both skip non-integer names) never loads a half-written version.
    `metadata["trained"]` defaults to False: only training marks a model as trained.
    """
    import keras
    import tensorflow as tf

    name = name or DEFAULT_NAMES[kind]
    model_dir = Path(model_root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and (version < 0 or (model_dir / str(version)).exists()):
        raise FileExistsError(f"{model_dir / str(version)} exists (or version is negative)")
    serve, contract = _serving_function(model, kind)

    # Track only the variables: tf.saved_model.save then skips walking Keras' object graph
    # (about half the save time for ResNet50), and the C++ loader still restores them.
    module = tf.Module()
    module.model_variables = [v.value for v in model.variables]
    started = time.perf_counter()
    tmp = model_dir / f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: serve.get_concrete_function()})
        meta: dict[str, Any] = {
            "kind": kind,
            "model": name,
            "trained": False,
            **contract,
            "signature": SIGNATURE,
            "inputs": {INPUT: "uint8 [N, H, W, 3] RGB, any tile size"},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "parameters": int(model.count_params()),
            "export_s": 0.0,
            **(metadata or {}),
        }
        for attempt in range(100):
            target = (
                version if version is not None else max(_version_dirs(model_dir), default=0) + 1
            )
            meta["version"] = target
            meta["export_s"] = round(time.perf_counter() - started, 3)
            (tmp / "assets.extra").mkdir(exist_ok=True)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            write_warmup_requests(tmp / WARMUP_FILE, name)
            try:
                # rename() fails on an existing non-empty folder: a racing exporter loses and
                # takes the next number instead of overwriting.
                if (model_dir / str(target)).exists():
                    raise FileExistsError(model_dir / str(target))
                os.rename(tmp, model_dir / str(target))
                return model_dir / str(target)
            except OSError:
                if version is not None or attempt == 99:
                    raise
        raise AssertionError("unreachable")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_TILE = 256


def write_warmup_requests(path: Path, name: str, batch: int = 2) -> None:
    """TF Serving replays these PredictionLog records when it loads a version, so the first
    real request does not pay for graph tracing and memory allocation."""
    import numpy as np
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    from prolifscore.core.tfrecord import frame
    from prolifscore.scoring.model_client import to_tensor_proto

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = SIGNATURE
    tiles = np.full((batch, WARMUP_TILE, WARMUP_TILE, 3), 200, np.uint8)
    request.inputs[INPUT].CopyFrom(to_tensor_proto(tiles))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    path.write_bytes(frame(log.SerializeToString()))


def export_untrained(
    model_root: Path | str,
    kind: Kind,
    *,
    name: str | None = None,
    version: int | None = None,
    input_size: int = 224,
    classes: int = 3,
    width: int = 16,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export a randomly initialised model (tests, demos), marked `trained: false`.

    Its outputs are meaningless and must never be presented as a result; use a small
    `input_size` (e.g. 64) for the tumor model in tests so export and load take seconds.
    """
    import keras

    keras.utils.set_random_seed(seed)
    if kind == "tumor":
        model = build_tumor_model(input_size=input_size, weights="none", classes=classes)
    elif kind == "mitosis":
        model = build_mitosis_model(width=width)
    else:
        raise ValueError(f"kind must be 'tumor' or 'mitosis', got {kind!r}")
    meta = {"note": "random initialisation: not a trained model", **(metadata or {})}
    meta["trained"] = False
    return export_model(model, kind, model_root, name=name, version=version, metadata=meta)
