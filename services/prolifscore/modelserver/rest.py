"""TF Serving's REST API beside the gRPC one (`--rest_api_port`; sources:
`http_rest_api_handler.cc`, `http_rest_api_util.cc`, `http_server.cc`):

    GET  /v1/models/NAME[/versions/N|/labels/L]            model status (GetModelStatus)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signature defs (GetModelMetadata)
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    Predict, row or columnar JSON

Answers are JSON; an error is `{"error": "<message>"}` with TF Serving's HTTP code for the
status (400 for INVALID_ARGUMENT and FAILED_PRECONDITION, 404 NOT_FOUND, 503 UNAVAILABLE, ...).
A `/v1/` path that matches none of these is 400 "Malformed request: ..."; any other path is 404
(metrics are on their own port, at /metrics). As in TF Serving, the status of a label is the
status of every version of the model (GetModelStatus ignores labels).
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
import tensorflow as tf
from google.protobuf import json_format
from google.protobuf.message import Message
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from prolifscore.core.runtime import metrics
from prolifscore.modelserver.config import NAME
from prolifscore.modelserver.errors import ServingError
from prolifscore.modelserver.json_tensor import fill_predict_request, outputs_json
from prolifscore.modelserver.manager import ModelManager
from prolifscore.modelserver.servable import DEFAULT_SIGNATURE
from prolifscore.modelserver.servicers import model_metadata, model_status, predict

log = logging.getLogger(__name__)

_SPEC = r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
_PREDICT = re.compile(_SPEC + r":(classify|regress|predict)", re.IGNORECASE)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_HTTP = {  # TF Serving's ToHTTPStatusCode
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    """TF Serving's ParseModelInfo + FillModelSpecWithNameVersionAndLabel."""
    spec = model_pb2.ModelSpec(name=unquote(name))
    if version:
        try:
            spec.version.value = int(version)
        except ValueError as exc:  # beyond int64
            raise _invalid(f"Failed to convert version: {version} to numeric.") from exc
    if label:
        spec.version_label = unquote(label)
    return spec


def _json(message: Message, *, field_names: bool) -> str:
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=field_names,
        always_print_fields_with_no_presence=True,
        indent=2,
    )


class RestApi:
    """The request handling, apart from HTTP: (method, path, body) -> (HTTP code, JSON)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return 200, self._dispatch(method, path, body)
        except ServingError as exc:
            metrics.FAILURES.labels(NAME, exc.code.name.lower()).inc()
            return _HTTP.get(exc.code, 500), json.dumps({"error": exc.message}).encode()
        except Exception as exc:  # a bug: the client still gets TF Serving's error shape
            log.exception("REST request failed", extra={"method": method, "path": path})
            metrics.FAILURES.labels(NAME, "internal").inc()
            return 500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()

    def _dispatch(self, method: str, path: str, body: bytes) -> bytes:
        if method == "POST" and (m := _PREDICT.fullmatch(path)):
            name, version, label, verb = m.groups()
            if verb.lower() != "predict":
                raise ServingError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{verb} is not supported: the served signatures are predict signatures",
                )
            return self._predict(_spec(name, version, label), body)
        if method == "GET" and (m := _STATUS.fullmatch(path)):
            name, version, label, metadata = m.groups()
            if not name:
                raise _invalid("Missing model name in request.")
            spec = _spec(name, version, label)
            if metadata:
                request = get_model_metadata_pb2.GetModelMetadataRequest(
                    model_spec=spec, metadata_field=["signature_def"]
                )
                return self._metadata_json(model_metadata(self.manager, request))
            status = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            return _json(model_status(self.manager, status), field_names=False).encode()
        raise _invalid(f"Malformed request: {method} {path}")

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> bytes:
        request = predict_pb2.PredictRequest(model_spec=spec)

        def inputs(signature: str) -> Any:
            servable = self.manager.resolve(request.model_spec)
            key = signature or DEFAULT_SIGNATURE
            if key not in servable.signature_defs:
                raise _invalid(f'Serving signature name: "{key}" not found in signature def')
            return servable.signature_defs[key].inputs

        fmt = fill_predict_request(body, inputs, request)
        response = predict(self.manager, request)
        outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        return outputs_json(outputs, fmt)

    @staticmethod
    def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
        """TF Serving's ToJsonString: model_spec, then the unpacked SignatureDefMap."""
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        spec = _json(response.model_spec, field_names=True)
        sigs = _json(sig_map, field_names=True)
        return f'{{\n"model_spec":{spec},\n"metadata": {{"signature_def": {sigs}}}\n}}\n'.encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: RestApi
    max_body: int

    def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body:
            self.close_connection = True
            error = {"error": f"request body of {length} bytes is over {self.max_body}"}
            self._reply(413, json.dumps(error).encode())
            return
        body = self.rfile.read(length) if length else b""
        if not re.fullmatch(r"/v1/.*", path, re.IGNORECASE):
            self._reply(404, b"Not Found\n", "text/plain")  # TF Serving ignores such paths
            return
        code, answer = self.api.handle(self.command, path, body)
        self._reply(code, answer)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("rest " + format, *args)


class RestServer:
    """The REST API on its own port and threads (TF Serving's --rest_api_port)."""

    def __init__(self, manager: ModelManager, host: str, port: int, max_body_mb: int) -> None:
        handler = type(
            "Handler", (_Handler,), {"api": RestApi(manager), "max_body": max_body_mb << 20}
        )
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> RestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
