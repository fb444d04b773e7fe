"""Export in TensorFlow Serving's layout: `MODEL_ROOT/<name>/<version>/` with one
`serving_default` signature, our metadata beside it and TF Serving's warm-up records."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prolifscore.core.models.architectures import (
    build_mitosis_model,
    build_tumor_model,
    tumor_outputs,
)
from prolifscore.core.models.contract import (
    DEFAULT_NAMES,
    INPUT,
    METADATA_FILE,
    MITOSIS_OFFSET,
    MITOSIS_OUTPUT,
    MITOSIS_PATCH,
    MITOSIS_RECEPTIVE_FIELD,
    MITOSIS_STRIDE,
    SIGNATURE,
    TUMOR_MOLECULAR_OUTPUT,
    TUMOR_OUTPUT,
    Kind,
    preprocess_mitosis,
    preprocess_tumor,
)

if TYPE_CHECKING:
    import keras


def _version_dirs(model_dir: Path) -> list[int]:
    """Every integer-named folder (complete or not): new versions must not collide with any."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def complete_versions(model_dir: Path | str) -> list[int]:
    """Versions of the model in `model_dir`, ascending: integer folders holding saved_model.pb.
    Exports in progress (hidden temporary names, or a folder whose saved_model.pb is not
    written yet) are not versions yet, for the model servers and clients alike."""
    model_dir = Path(model_dir)
    return [
        v for v in _version_dirs(model_dir) if (model_dir / str(v) / "saved_model.pb").is_file()
    ]


def list_versions(model_root: Path | str, name: str) -> list[int]:
    """Complete versions of model `name` under a model root, ascending."""
    return complete_versions(Path(model_root) / name)


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
        return _tumor_serving_function(model, spec)
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


def _tumor_serving_function(model: keras.Model, spec: Any) -> tuple[Any, dict[str, Any]]:
    """The tumor signature: `probabilities`, and `molecular_score` when the model has that head
    (models without it keep today's single-output signature)."""
    import tensorflow as tf

    input_size = int(model.input_shape[1])
    molecular = isinstance(model.output, dict)
    classes = int((model.output["tumor_score"] if molecular else model.output).shape[-1])

    @tf.function(input_signature=[spec])
    def serve_tumor(tiles: tf.Tensor) -> dict[str, tf.Tensor]:
        probs, values = tumor_outputs(model(preprocess_tumor(tiles, input_size), training=False))
        out = {TUMOR_OUTPUT: tf.cast(probs, tf.float32)}
        if values is not None:
            out[TUMOR_MOLECULAR_OUTPUT] = tf.cast(values, tf.float32)
        return out

    outputs = {TUMOR_OUTPUT: f"float32 [N, {classes}] softmax"}
    if molecular:
        outputs[TUMOR_MOLECULAR_OUTPUT] = "float32 [N] molecular score per tile"
    return serve_tumor, {
        "input_size": input_size,
        "classes": classes,
        "preprocessing": "bilinear antialiased resize to input_size, ResNet50 caffe",
        "outputs": outputs,
        # Training replaces this with the head's facts; an untrained export says so.
        "molecular_head": (
            {"output": TUMOR_MOLECULAR_OUTPUT, "trained": False, "slide_value": "mean of tiles"}
            if molecular
            else None
        ),
    }


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

    from prolifscore.core.models.tensors import to_tensor_proto
    from prolifscore.core.wsi.tfrecord import frame

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
    molecular: tuple[float, float] | None = None,
) -> Path:
    """Export a randomly initialised model (tests, demos), marked `trained: false`.

    Its outputs are meaningless and must never be presented as a result; use a small
    `input_size` (e.g. 64) for the tumor model in tests so export and load take seconds.
    `molecular` (mean, std) adds the untrained molecular head (its metadata says untrained).
    """
    import keras

    keras.utils.set_random_seed(seed)
    if kind == "tumor":
        model = build_tumor_model(input_size, "none", classes, molecular)
    elif kind == "mitosis":
        model = build_mitosis_model(width=width)
    else:
        raise ValueError(f"kind must be 'tumor' or 'mitosis', got {kind!r}")
    meta = {"note": "random initialisation: not a trained model", **(metadata or {})}
    meta["trained"] = False
    return export_model(model, kind, model_root, name=name, version=version, metadata=meta)
