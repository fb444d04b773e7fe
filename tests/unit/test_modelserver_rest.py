"""The local model server's REST API as TF Serving's clients use it: model status, metadata,
Predict in row and columnar JSON (same numbers as gRPC), `{"b64": ...}` for DT_STRING, errors
worded and coded as TF Serving's; the Kubernetes probe script against the real server; metrics
only at /metrics on their own port."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from prolifscore.modelserver.server import ModelServer  # noqa: E402
from tests.modelserving import Client, predict_request, start_server, tiles  # noqa: E402

PROBE = Path(__file__).parents[2] / "k8s" / "base" / "config" / "tfserving-probe.sh"


def _export_strings_model(root: Path) -> None:
    """A SavedModel whose signature takes DT_STRING: where TF Serving's b64 objects apply."""

    class Echo(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"length": tf.strings.length(text), "echo_bytes": text}

    module = Echo()
    tf.saved_model.save(
        module, str(root / "strings" / "1"), signatures={"serving_default": module.serve}
    )


@pytest.fixture(scope="module")
def served(
    exported_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ModelServer, Client]]:
    root = tmp_path_factory.mktemp("models")
    for name in ("resnet50", "mitosis"):
        shutil.copytree(exported_root / name, root / name)
    _export_strings_model(root)
    server, client = start_server(root)
    yield server, client
    server.stop()


@pytest.fixture(scope="module")
def client(served: tuple[ModelServer, Client]) -> Client:
    return served[1]


def test_status_and_metadata(client: Client) -> None:
    available = {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert client.http("GET", "/v1/models/resnet50") == (200, available)
    assert client.http("GET", "/v1/models/resnet50/versions/1") == (200, available)
    assert client.http("GET", "/V1/Models/resnet50") == (200, available)  # TF's (?i) regex
    assert client.http("GET", "/v1/models/resnet50/versions/7") == (
        404,
        {"error": "Could not find version 7 of model resnet50"},
    )
    assert client.http("GET", "/v1/models/nope") == (
        404,
        {"error": "Could not find any versions of model nope"},
    )
    assert client.http("GET", "/v1/models") == (400, {"error": "Missing model name in request."})

    code, meta = client.http("GET", "/v1/models/resnet50/metadata")
    assert code == 200
    assert meta["model_spec"] == {"name": "resnet50", "version": "1", "signature_name": ""}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["tiles"]["dtype"] == "DT_UINT8"
    assert [d["size"] for d in sig["inputs"]["tiles"]["tensor_shape"]["dim"]] == [
        "-1",
        "-1",
        "-1",
        "3",
    ]
    assert client.http("GET", "/v1/models/resnet50/versions/7/metadata") == (
        404,
        {"error": "Servable not found for request: Specific(resnet50, 7)"},
    )


def test_unknown_paths_and_methods(client: Client) -> None:
    assert client.http("GET", "/v1/foo") == (400, {"error": "Malformed request: GET /v1/foo"})
    assert client.http("POST", "/v1/models/resnet50") == (
        400,
        {"error": "Malformed request: POST /v1/models/resnet50"},
    )
    assert client.http("GET", "/metrics")[0] == 404  # not TF Serving's to answer
    assert client.http("GET", "/")[0] == 404
    code, body = client.http("POST", "/v1/models/resnet50:classify", {"examples": [{}]})
    assert code == 501 and "predict signatures" in body["error"]


@pytest.mark.parametrize(
    ("model", "output", "shape"),
    [("resnet50", "probabilities", (3, 40, 40)), ("mitosis", "mitosis_map", (2, 64, 48))],
)
def test_predict_row_and_columnar_match_grpc(
    client: Client, model: str, output: str, shape: tuple[int, int, int]
) -> None:
    pixels = tiles(*shape, seed=3)
    expected = tf.make_ndarray(client.run(predict_request(model, pixels)).outputs[output])
    rows = pixels.tolist()

    code, body = client.http("POST", f"/v1/models/{model}:predict", {"instances": rows})
    assert code == 200, body
    np.testing.assert_allclose(np.asarray(body["predictions"]), expected, rtol=1e-6, atol=1e-7)

    named = {"instances": [{"tiles": t} for t in rows], "signature_name": "serving_default"}
    code, body = client.http("POST", f"/v1/models/{model}/versions/1:predict", named)
    assert code == 200, body
    np.testing.assert_allclose(np.asarray(body["predictions"]), expected, rtol=1e-6, atol=1e-7)

    for inputs in (rows, {"tiles": rows}):
        code, body = client.http("POST", f"/v1/models/{model}:predict", {"inputs": inputs})
        assert code == 200, body
        np.testing.assert_allclose(np.asarray(body["outputs"]), expected, rtol=1e-6, atol=1e-7)


def test_predict_errors_as_tf_serving_words_them(client: Client) -> None:
    url = "/v1/models/resnet50:predict"
    one = tiles(1, 8, 8).tolist()

    def error(body: object, path: str = url) -> tuple[int, str]:
        code, answer = client.http("POST", path, body)
        return code, answer["error"]

    assert error(b"") == (400, "JSON Parse error: The document is empty")
    code, message = error(b"{ 'instances': [1, 2]")
    assert code == 400 and message.startswith("JSON Parse error: ")
    assert error({"instance": one}) == (400, "Missing 'inputs' or 'instances' key")
    code, message = error({"instances": one, "inputs": one})
    assert code == 400 and message.endswith(
        "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "
    )
    code, message = error({"instances": []})
    assert code == 400 and message.endswith("No values in 'instances' array")
    code, message = error({"signature_name": 100, "instances": one})
    assert code == 400 and message.endswith("'signature_name' key must be a string value.")
    assert error({"signature_name": "predict", "instances": one}) == (
        400,
        'Serving signature name: "predict" not found in signature def',
    )
    assert error({"inputs": [[[[1.5, 0, 0]]]]}) == (
        400,
        "JSON Value: 1.5 Type: Number is not of expected type: uint8",
    )
    assert error({"inputs": [[[[0, 0, 0], [0, 0]]]]}) == (
        400,
        "Encountered list at unexpected size: 2 at level: 3 expected size: 3",
    )
    # uint8 tiles are numbers: a b64 object is TF Serving's type error (DT_STRING only)
    assert error({"instances": [{"b64": "AAAA"}]}) == (
        400,
        "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: "
        '{"b64":"AAAA"} Type: Object is not of expected type: uint8',
    )
    assert error({"instances": [tiles(1, 8, 8)[0].tolist(), tiles(1, 9, 9)[0].tolist()]}) == (
        400,
        "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting "
        "tensor size: 192 but got: 243",
    )
    assert error({"instances": one}, "/v1/models/nope:predict") == (
        404,
        "Servable not found for request: Latest(nope)",
    )
    assert error({"instances": one}, "/v1/models/resnet50/versions/7:predict") == (
        404,
        "Servable not found for request: Specific(resnet50, 7)",
    )
    assert error({"instances": one}, "/v1/models/resnet50/labels/stable:predict") == (
        400,
        "Unrecognized servable version label: stable",
    )


def test_b64_strings_in_and_out(client: Client) -> None:
    """DT_STRING inputs take `{"b64": ...}` or plain strings; outputs named *_bytes come back
    as b64 objects, as TF Serving writes them."""
    blob = b"\x00\xffab"
    b64 = base64.b64encode(blob).decode()
    code, body = client.http(
        "POST", "/v1/models/strings:predict", {"instances": [{"b64": b64}, "xyz"]}
    )
    assert code == 200, body
    assert body == {
        "predictions": [
            {"echo_bytes": {"b64": b64}, "length": 4},
            {"echo_bytes": {"b64": "eHl6"}, "length": 3},
        ]
    }
    code, body = client.http("POST", "/v1/models/strings:predict", {"inputs": [{"b64": b64}]})
    assert (code, body) == (200, {"outputs": {"echo_bytes": [{"b64": b64}], "length": [4]}})
    code, body = client.http(
        "POST", "/v1/models/strings:predict", {"inputs": {"text": [{"b64": "!!"}]}}
    )
    assert (code, body) == (400, {"error": "Unable to base64 decode"})


def _probe(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    return subprocess.run(
        [bash, str(PROBE), *args],
        env={"PATH": "/usr/bin:/bin", "REST_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kubernetes_probe_script_passes_against_the_local_server(
    served: tuple[ModelServer, Client],
) -> None:
    """k8s/base/config/tfserving-probe.sh (readiness: GetModelStatus over REST; startup: plus
    one Predict per model) run for real against this server, as the kubelet runs it."""
    server, client = served
    calls = server.manager.served["mitosis"][1].model_calls
    assert _probe(client.rest_port, "ready", "resnet50", "mitosis").returncode == 0
    assert server.manager.served["mitosis"][1].model_calls == calls, "readiness predicts nothing"
    warm = _probe(client.rest_port, "warmup", "resnet50", "mitosis")
    assert warm.returncode == 0 and "failed" not in warm.stderr, warm.stderr
    assert server.manager.served["mitosis"][1].model_calls == calls + 1
    missing = _probe(client.rest_port, "ready", "resnet50", "no-such-model")
    assert missing.returncode != 0 and "model no-such-model is not AVAILABLE" in missing.stderr


def test_metrics_port_serves_metrics_only(served: tuple[ModelServer, Client]) -> None:
    """A REST status probe sent to the metrics port by mistake must fail, not read 200."""
    port = served[0].runtime.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200 and b"prolif_work_seconds" in response.read()
    for path in ("/v1/models/resnet50", "/", "/metrics/extra"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
        assert info.value.code == 404
