"""One loaded SavedModel version: its signatures, warm-up, and Predict with TF Serving's checks.

Clients use the standard `tensorflow_serving.apis` stubs and must not be able to tell this server
from TF Serving, so requests are validated in TF Serving's order and rejected with its status
codes and messages (sources: tensorflow/serving `predict_util.cc`, `get_model_metadata_impl.cc`,
`get_model_status_impl.cc`, `server_core.cc`, `core/manager.h`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import predict_pb2

from prolifscore.core.models.export import read_metadata

log = logging.getLogger(__name__)
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class ServingError(Exception):
    """A request failure with the gRPC status code TF Serving would answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Servable:
    """A loaded SavedModel version: its signatures and their SignatureDefs."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name = name
        self.version = version
        self.path = path
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
        if not graphs:
            raise ValueError(f"{path}: no meta graph tagged 'serve'")
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(graphs[0].signature_def)
        self._loaded = tf.saved_model.load(str(path), tags=["serve"])
        self.functions = dict(self._loaded.signatures.items())
        self.metadata = read_metadata(path)

    def warmup(self) -> None:
        """One tiny request per signature, so the first client does not pay graph setup."""
        size = int(self.metadata.get("input_size", 64))
        for key, fn in self.functions.items():
            sig = self.signature_defs.get(key)
            if sig is None:
                continue
            inputs = {}
            for alias, info in sig.inputs.items():
                dims = [d.size for d in info.tensor_shape.dim]
                shape = [(1 if i == 0 else size) if d < 0 else d for i, d in enumerate(dims)]
                dtype = tf.dtypes.as_dtype(info.dtype)
                inputs[alias] = tf.zeros(shape, dtype)
            try:
                fn(**inputs)
            except Exception as exc:  # warm-up is best effort; real requests report errors
                log.info(
                    "warm-up skipped",
                    extra={"model": self.name, "signature": key, "error": str(exc)[:200]},
                )

    def predict(self, request: predict_pb2.PredictRequest, signature_name: str) -> dict[str, Any]:
        """Validate like TF Serving's PreProcessPrediction, run, return the filtered outputs."""
        sig = self.signature_defs.get(signature_name)
        fn = self.functions.get(signature_name)
        if sig is None or fn is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        sent, wanted = set(request.inputs), set(sig.inputs)
        if len(sent) != len(wanted) and not (len(sent) < len(wanted) and sig.defaults):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
            )
        feeds: dict[str, tf.Tensor] = {}
        for index, (alias, info) in enumerate(sorted(sig.inputs.items())):
            if alias not in request.inputs and alias in sig.defaults:
                feeds[alias] = tf.constant(tf.make_ndarray(sig.defaults[alias]))
                continue
            if alias not in request.inputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Signature input alias: {alias}(feed name: {info.name}) not found in "
                    f"request and no default value provided. Inputs expected to be in the "
                    f"request {{{','.join(sorted(sent))}}}, or default input alias set: {{}}",
                )
            feeds[alias] = _to_tensor(alias, index, request.inputs[alias], info)
        aliases = list(request.output_filter)
        for alias in aliases:
            if alias not in sig.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{','.join(sorted(sig.outputs))}}}.",
                )
        if len(set(aliases)) != len(aliases):
            dup = next(a for a in aliases if aliases.count(a) > 1)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {dup}"
            )
        try:
            outputs = fn(**feeds)
        except tf.errors.OpError as exc:
            code = _CODES.get(exc.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, exc.message) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return {a: outputs[a] for a in (aliases or sorted(sig.outputs))}


def _dtype_name(dtype: int) -> str:
    """TF's C++ DataTypeString spelling ("float", not Python's "float32") for TF's messages."""
    if not dtype:
        return "invalid"
    name = tf.dtypes.as_dtype(dtype).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _to_tensor(alias: str, index: int, proto: Any, info: meta_graph_pb2.TensorInfo) -> tf.Tensor:
    """TensorProto -> tensor, checked against the signature's dtype and shape."""
    if proto.dtype != info.dtype:
        got = _dtype_name(proto.dtype)
        want = _dtype_name(info.dtype)
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expects arg[{index}] to be {want} but {got} is provided",
        )
    try:
        array = tf.make_ndarray(proto)
    except Exception as exc:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}: {exc}"
        ) from exc
    if not info.tensor_shape.unknown_rank:
        want = [d.size for d in info.tensor_shape.dim]
        if len(want) != array.ndim or any(
            w >= 0 and w != g for w, g in zip(want, array.shape, strict=True)
        ):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {alias} has shape {list(array.shape)}, the signature expects "
                f"{want} (-1 = any)",
            )
    return tf.convert_to_tensor(array)
