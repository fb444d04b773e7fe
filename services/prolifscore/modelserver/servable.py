"""One loaded SavedModel version: its signatures, and Predict with TF Serving's checks.

Clients use the standard `tensorflow_serving.apis` stubs and must not be able to tell this server
from TF Serving, so requests are validated in TF Serving's order and rejected with its status
codes and messages (sources: tensorflow/serving `predict_util.cc`, `get_model_metadata_impl.cc`,
`get_model_status_impl.cc`, `server_core.cc`, `core/manager.h`).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import predict_pb2

from prolifscore.core.models.export import read_metadata
from prolifscore.modelserver.batching import BatchQueue, BatchScheduler, QueueClosed
from prolifscore.modelserver.errors import ServingError

log = logging.getLogger(__name__)
_CODES = {c.value[0]: c for c in grpc.StatusCode}
DEFAULT_SIGNATURE = "serving_default"  # TF Serving's kDefaultServingSignatureDefKey


class Servable:
    """A loaded SavedModel version: its signatures and their SignatureDefs.

    With a batch scheduler, each signature has a queue, and Predict calls that ask for all of
    its outputs share model calls with concurrent ones (TF Serving's BatchingSession batches
    only Run() calls that match a whole signature; the others run on their own)."""

    def __init__(
        self, name: str, version: int, path: Path, batcher: BatchScheduler | None = None
    ) -> None:
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
        self.model_calls = 0  # signature function calls: what batching saves
        self._calls = threading.Lock()
        self._batcher = batcher
        self._queues: dict[str, BatchQueue] = {}
        if batcher is not None:
            for key in self.functions:
                run = functools.partial(self.call, key)
                self._queues[key] = batcher.add_queue(run, f"{name}/{version}/{key}")

    def close(self) -> None:
        """Unloaded: requests still holding this version run unbatched."""
        if self._batcher is not None:
            for queue in self._queues.values():
                self._batcher.close_queue(queue)

    def predict(
        self, request: predict_pb2.PredictRequest, signature_name: str, *, batched: bool = True
    ) -> dict[str, np.ndarray]:
        """Validate like TF Serving's PreProcessPrediction, run (through the signature's batch
        queue unless `batched` is False), return the filtered outputs."""
        sig = self.signature_defs.get(signature_name)
        if sig is None or signature_name not in self.functions:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        feeds = _feeds(request, sig)
        aliases = _output_aliases(request, sig)
        queue = self._queues.get(signature_name) if batched else None
        if queue is not None and (not aliases or set(aliases) == set(sig.outputs)):
            try:
                outputs = queue.submit(feeds)
            except QueueClosed:
                outputs = self.call(signature_name, feeds)
        else:
            outputs = self.call(signature_name, feeds)
        return {a: outputs[a] for a in (aliases or sorted(sig.outputs))}

    def call(self, signature_name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the signature function (a whole batch when batching)."""
        fn = self.functions[signature_name]
        with self._calls:
            self.model_calls += 1
        try:
            outputs = fn(**{alias: tf.constant(array) for alias, array in feeds.items()})
        except tf.errors.OpError as exc:
            code = _CODES.get(exc.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, exc.message) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}


def _feeds(
    request: predict_pb2.PredictRequest, sig: meta_graph_pb2.SignatureDef
) -> dict[str, np.ndarray]:
    """The request's inputs checked against the signature, in TF Serving's order and words."""
    sent, wanted = set(request.inputs), set(sig.inputs)
    if len(sent) != len(wanted) and not (len(sent) < len(wanted) and sig.defaults):
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input size does not match signature: {len(sent)}!={len(wanted)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
            f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
        )
    feeds: dict[str, np.ndarray] = {}
    for index, (alias, info) in enumerate(sorted(sig.inputs.items())):
        if alias not in request.inputs and alias in sig.defaults:
            feeds[alias] = tf.make_ndarray(sig.defaults[alias])
            continue
        if alias not in request.inputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Signature input alias: {alias}(feed name: {info.name}) not found in "
                f"request and no default value provided. Inputs expected to be in the "
                f"request {{{','.join(sorted(sent))}}}, or default input alias set: {{}}",
            )
        feeds[alias] = _to_array(alias, index, request.inputs[alias], info)
    return feeds


def _output_aliases(
    request: predict_pb2.PredictRequest, sig: meta_graph_pb2.SignatureDef
) -> list[str]:
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
    return aliases


def _dtype_name(dtype: int) -> str:
    """TF's C++ DataTypeString spelling ("float", not Python's "float32") for TF's messages."""
    if not dtype:
        return "invalid"
    name = tf.dtypes.as_dtype(dtype).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _to_array(alias: str, index: int, proto: Any, info: meta_graph_pb2.TensorInfo) -> np.ndarray:
    """TensorProto -> array, checked against the signature's dtype and shape."""
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
    return array
