"""TF Serving's REST JSON <-> tensors (`tensorflow_serving/util/json_tensor.cc`): a predict body
in row (`instances`) or columnar (`inputs`) format becomes the PredictRequest's inputs, typed by
the signature (numbers as nested lists, `{"b64": ...}` for DT_STRING); outputs go back in the
request's format (`predictions` / `outputs`), floats written as TF Serving writes them.

Errors are INVALID_ARGUMENT with TF Serving's messages. Where a message quotes a JSON value, the
value is rendered on one line (TF Serving pretty-prints it) and cut at 2000 characters."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from prolifscore.modelserver.errors import ServingError

ROW, COLUMNAR = "row", "columnar"
InfoMap = Mapping[str, meta_graph_pb2.TensorInfo]
_INT32 = (types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8)
_FLOAT_MAX_INT = {types_pb2.DT_FLOAT: (1 << 24) - 1, types_pb2.DT_DOUBLE: (1 << 53) - 1}
_FLOAT_RANGE = {
    types_pb2.DT_FLOAT: float(np.finfo(np.float32).max),
    types_pb2.DT_DOUBLE: float(np.finfo(np.float64).max),
}


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _status_string(exc: ServingError) -> str:
    """TF's Status::ToString(), which nested messages quote."""
    return f"{exc.code.name}: {exc.message}"


def dtype_string(dtype: int) -> str:
    """TF's DataTypeString ("float", "uint8", "string")."""
    name = tf.dtypes.as_dtype(dtype).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _render(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 2000 else text[:2000] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return "Number"
    return {dict: "Object", list: "Array", str: "String"}[type(value)]


def _type_error(value: Any, dtype: int) -> ServingError:
    return _invalid(
        f"JSON Value: {_render(value)} Type: {_json_type(value)} is not of expected type: "
        f"{dtype_string(dtype)}"
    )


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _b64(value: Any) -> bytes:
    if not _is_b64(value):
        raise _invalid(f"JSON Value: {_render(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("Unable to base64 decode") from exc


def _scalar(value: Any, dtype: int) -> Any:
    """TF Serving's AddValueToTensor: one JSON leaf checked against the tensor's dtype."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in _FLOAT_MAX_INT:
        if not number:
            raise _type_error(value, dtype)
        lossless = (
            abs(value) <= _FLOAT_MAX_INT[dtype]
            if isinstance(value, int)
            else not np.isfinite(value) or abs(value) <= _FLOAT_RANGE[dtype]
        )
        if not lossless:
            target = "float" if dtype == types_pb2.DT_FLOAT else "double"
            raise _invalid(
                f"Cannot convert JSON value: {_render(value)} to {target} without loss of "
                "precision."
            )
        return value
    if dtype == types_pb2.DT_STRING:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode()
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    bounds = {
        types_pb2.DT_INT64: (-(1 << 63), (1 << 63) - 1),
        types_pb2.DT_UINT32: (0, (1 << 32) - 1),
        types_pb2.DT_UINT64: (0, (1 << 64) - 1),
        **dict.fromkeys(_INT32, (-(1 << 31), (1 << 31) - 1)),
    }
    if dtype not in bounds:
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON Value: {_render(value)} to type: {dtype_string(dtype)}",
        )
    low, high = bounds[dtype]
    if not (number and isinstance(value, int) and low <= value <= high):
        raise _type_error(value, dtype)
    return value


def _dense_shape(value: Any) -> list[int]:
    """TF Serving's GetDenseTensorShape: the sizes of the first element at each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, dtype: int, shape: list[int], out: list[Any]) -> None:
    """TF Serving's FillTensorProto: every leaf at the tensor's rank, every list its size."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise _invalid(
                f"JSON Value: {_render(value)} found at incorrect level: {level + 1} in the JSON "
                f"DOM. Expected at level: {rank}"
            )
        if isinstance(value, dict):
            if dtype != types_pb2.DT_STRING:
                raise _type_error(value, dtype)
            out.append(_b64(value))
        else:
            out.append(_scalar(value, dtype))
        return
    if level >= rank:
        raise _invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise _invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} expected "
            f"size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, dtype, shape, out)


def _fast(value: Any, dtype: int) -> np.ndarray | None:
    """A well-formed numeric nested list straight through numpy (a 256 px tile is 196k
    numbers); None sends it down the checking path, which finds TF Serving's error."""
    if dtype == types_pb2.DT_STRING or not isinstance(value, list):
        return None
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        return None
    numpy_dtype = tf.dtypes.as_dtype(dtype).as_numpy_dtype
    kind = array.dtype.kind
    if dtype in _FLOAT_MAX_INT:
        if kind in "iu" and array.size and np.abs(array).max() > _FLOAT_MAX_INT[dtype]:
            return None
        if kind == "f" and np.any(np.isfinite(array) & (np.abs(array) > _FLOAT_RANGE[dtype])):
            return None
        return array.astype(numpy_dtype) if kind in "iuf" else None
    if dtype in _INT32 and kind in "iu" and array.size:
        if array.min() < -(1 << 31) or array.max() >= 1 << 31:
            return None
        return array.astype(np.int64).astype(numpy_dtype)  # wraps like TF's static_cast
    if dtype == types_pb2.DT_INT64 and kind == "i":
        return array.astype(np.int64)
    if dtype == types_pb2.DT_BOOL and kind == "b":
        return array
    return None


def json_to_array(value: Any, dtype: int) -> np.ndarray:
    """A JSON value (nested lists, a scalar, a b64 object) -> array of the signature's dtype."""
    fast = _fast(value, dtype)
    if fast is not None:
        return fast
    shape = _dense_shape(value)
    values: list[Any] = []
    _fill(value, 0, dtype, shape, values)
    numpy_dtype = object if dtype == types_pb2.DT_STRING else tf.dtypes.as_dtype(dtype)
    if numpy_dtype is object:
        return np.array(values, dtype=object).reshape(shape)
    return np.array(values).astype(numpy_dtype.as_numpy_dtype).reshape(shape)


def _parse_document(body: bytes) -> dict[str, Any]:
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = exc.pos if isinstance(exc, json.JSONDecodeError) else exc.start
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
        raise _invalid(f"JSON Parse error: {reason} at offset: {where}") from exc
    if not isinstance(doc, dict):
        raise _invalid(f"JSON Value: {_render(doc)} Is not object")
    return doc


def fill_predict_request(
    body: bytes, infos: Callable[[str], InfoMap], request: predict_pb2.PredictRequest
) -> str:
    """TF Serving's FillPredictRequestFromJson: the body into `request` (signature name and
    inputs); returns the format (ROW or COLUMNAR) the response must use."""
    doc = _parse_document(body)
    if "signature_name" in doc:
        if not isinstance(doc["signature_name"], str):
            raise _invalid(
                f"JSON Value: {_render(doc)} not formatted correctly. 'signature_name' key must "
                "be a string value."
            )
        request.model_spec.signature_name = doc["signature_name"]
    name = request.model_spec.signature_name
    info_map = infos(name)
    if not info_map:
        raise _invalid(f"Failed to get input map for signature: {name or 'DEFAULT'}")
    if "instances" in doc and "inputs" in doc:
        raise _invalid(
            f"JSON Value: {_render(doc)} Not formatted correctly expecting only one of 'inputs' "
            "or 'instances' keys to exist "
        )
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise _invalid(f"JSON Value: {_render(doc)} Excepting 'instances' to be an list/array")
        if not instances:
            raise _invalid(f"JSON Value: {_render(doc)} No values in 'instances' array")
        arrays = _from_instances(instances, info_map)
        fmt = ROW
    elif "inputs" in doc:
        arrays = _from_inputs(doc["inputs"], info_map)
        fmt = COLUMNAR
    else:
        raise _invalid("Missing 'inputs' or 'instances' key")
    for alias, array in arrays.items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(array, dtype=info_map[alias].dtype))
    return fmt


def _from_instances(instances: list[Any], infos: InfoMap) -> dict[str, np.ndarray]:
    """Row format: one tensor per input, the instances stacked along a new batch dimension."""
    if not _is_object(instances[0]) and len(infos) > 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple input "
            "tensors required as per tensorinfo_map"
        )
    objects = _is_object(instances[0])
    names = sorted(infos)
    rows: dict[str, list[np.ndarray]] = {}
    for i, element in enumerate(instances):
        if objects:
            if not _is_object(element):
                raise _invalid(f"Expecting object but got list at item {i} of input list")
            for key, value in element.items():
                try:
                    _add_row(rows, key, value, infos)
                except ServingError as exc:
                    raise _invalid(
                        f"Failed to process element: {i} key: {key} of 'instances' list. "
                        f"Error: {_status_string(exc)}"
                    ) from exc
            if set(element) != set(names):
                raise _invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: "
                    f"{_render(element)} keys must be equal to: {','.join(names)}"
                )
        else:
            if _is_object(element):
                raise _invalid(f"Expecting value/list but got object at item {i} of input list")
            try:
                _add_row(rows, names[0], element, infos)
            except ServingError as exc:
                raise _invalid(
                    f"Failed to process element: {i} of 'instances' list. Error: "
                    f"{_status_string(exc)}"
                ) from exc
    return {name: np.stack(parts) for name, parts in rows.items()}


def _add_row(rows: dict[str, list[np.ndarray]], name: str, value: Any, infos: InfoMap) -> None:
    if name not in infos:
        raise _invalid(f"JSON object: does not have named input: {name}")
    array = json_to_array(value, infos[name].dtype)
    if name in rows:
        first = rows[name][0]
        if first.size != array.size:
            raise _invalid(f"Expecting tensor size: {first.size} but got: {array.size}")
        if first.shape != array.shape:
            raise _invalid(
                f"Expecting shape [{','.join(map(str, first.shape))}] but got: "
                f"[{','.join(map(str, array.shape))}]"
            )
    rows.setdefault(name, []).append(array)


def _from_inputs(value: Any, infos: InfoMap) -> dict[str, np.ndarray]:
    """Columnar format: a value for the only input, or an object naming every input."""
    if not isinstance(value, dict) or _is_b64(value):
        if len(infos) > 1:
            raise _invalid(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        (name,) = infos
        return {name: json_to_array(value, infos[name].dtype)}
    arrays = {}
    for name, info in infos.items():
        if name not in value:
            raise _invalid(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = json_to_array(value[name], info.dtype)
    return arrays


# -- responses
def _decimals(array: np.ndarray) -> np.ndarray:
    """TF Serving's WriteDecimal: six significant digits unless that does not round-trip, then
    full precision; whole numbers get ".0"; NaN and Infinity as such."""
    full = "%.17g" if array.dtype == np.float64 else "%.9g"
    if array.dtype != np.float64:
        array = array.astype(np.float32)
    finite = np.isfinite(array)
    safe = np.where(finite, array, 0)
    short = np.char.mod("%.6g", safe)
    text = np.where(short.astype(array.dtype) == safe, short, np.char.mod(full, safe))
    plain = (np.char.find(text, ".") < 0) & (np.char.find(text, "e") < 0)
    text = np.where(plain, np.char.add(text, ".0"), text)
    text = np.where(np.isnan(array), "NaN", text)
    return np.where(np.isinf(array), np.where(array > 0, "Infinity", "-Infinity"), text)


def _leaves(array: np.ndarray, as_b64: bool) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "f":
        return _decimals(array)
    if kind in "iu":
        return array.astype(str)
    if kind == "b":
        return np.where(array, "true", "false")
    flat = [
        json.dumps({"b64": base64.b64encode(v).decode()})
        if as_b64
        else json.dumps(v.decode(errors="replace") if isinstance(v, bytes) else str(v))
        for v in array.reshape(-1)
    ]
    return np.array(flat, dtype=object).reshape(array.shape)


def _nest(text: Any) -> str:
    if not isinstance(text, np.ndarray):  # one leaf (a numpy scalar, or a str of an object array)
        return str(text)
    if text.ndim == 0:
        return str(text.item())
    if text.ndim == 1:
        return "[" + ",".join(text.tolist()) + "]"
    return "[" + ",".join(_nest(part) for part in text) + "]"


def _value_json(name: str, array: np.ndarray) -> str:
    """A tensor as nested JSON lists; DT_STRING outputs named *_bytes as b64 objects."""
    return _nest(_leaves(array, name.endswith("_bytes")))


def outputs_json(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """TF Serving's MakeJsonFromTensors for the request's format."""
    if not outputs:
        raise _invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            body = _value_json(names[0], outputs[names[0]])
        else:
            body = "{" + ",".join(f"{json.dumps(n)}:{_value_json(n, outputs[n])}" for n in names)
            body += "}"
        return ('{"outputs":' + body + "}").encode()
    batch = -1
    for name in names:
        array = outputs[name]
        if array.ndim == 0:
            raise _invalid(f"Tensor name: {name} has no shape information ")
        if batch >= 0 and array.shape[0] != batch:
            raise _invalid(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} "
                f"expecting: {batch}"
            )
        batch = array.shape[0]
    rendered = {n: _leaves(outputs[n], n.endswith("_bytes")) for n in names}
    items = []
    for i in range(batch):
        if len(names) == 1:
            items.append(_nest(rendered[names[0]][i]))
        else:
            items.append(
                "{" + ",".join(f"{json.dumps(n)}:{_nest(rendered[n][i])}" for n in names) + "}"
            )
    return ('{"predictions":[' + ",".join(items) + "]}").encode()
