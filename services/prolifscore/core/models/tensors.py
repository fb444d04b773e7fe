"""numpy arrays <-> TensorFlow's TensorProto, the payload of TF Serving's Predict API (shared by
the scoring client, the local model server's tests and export-time warm-up records), and the
gRPC message limits that payload needs."""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

_NP_TO_DT = {np.dtype(np.uint8): types_pb2.DT_UINT8, np.dtype(np.float32): types_pb2.DT_FLOAT}
_DT_TO_NP = {
    types_pb2.DT_FLOAT: np.float32,
    types_pb2.DT_UINT8: np.uint8,
    types_pb2.DT_INT64: np.int64,
}


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """Raw bytes in `tensor_content`: no per-element encoding (a batch is megabytes)."""
    array = np.ascontiguousarray(array)
    return tensor_pb2.TensorProto(
        dtype=_NP_TO_DT[array.dtype],
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
        ),
        tensor_content=array.tobytes(),
    )


def from_tensor_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    dtype = _DT_TO_NP[proto.dtype]
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype).reshape(shape)
    values = proto.float_val if dtype == np.float32 else proto.int64_val
    return np.asarray(values, dtype).reshape(shape)


def grpc_message_options(max_message_mb: int) -> list[tuple[str, int]]:
    """gRPC channel/server options for tile batches (32 float32 224 px tiles are 19 MB; gRPC's
    default limit is 4 MB): the model server and its clients set the same on both ends."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
