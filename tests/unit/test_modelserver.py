"""The local model server through the standard TF Serving client (`PredictionServiceStub`,
`ModelServiceStub`): same predictions as the SavedModel in-process, hot version pickup, version
policies from a TF Serving config file, TF Serving's status codes."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

from prolifscore.core.models.export import export_untrained  # noqa: E402
from prolifscore.localstack.broker import free_port  # noqa: E402
from tests.modelserving import Client, start_server, wait_for  # noqa: E402
from tests.modelserving import predict_request as _request  # noqa: E402
from tests.modelserving import tiles as _tiles  # noqa: E402

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


@pytest.fixture(scope="module")
def root(exported_root: Path) -> Path:
    """A model root with both models (untrained, small), as training would leave it."""
    return exported_root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[Client]:
    server, client = start_server(root)
    yield client
    server.stop()


def test_predictions_match_the_saved_model_in_process(root: Path, client: Client) -> None:
    for name, output, tiles in (
        ("resnet50", "probabilities", _tiles(4, 80, 80)),
        ("mitosis", "mitosis_map", _tiles(3, 96, 128)),
    ):
        response = client.run(_request(name, tiles))
        assert response.model_spec.name == name
        assert response.model_spec.version.value == 1
        assert response.model_spec.signature_name == "serving_default"
        served = tf.make_ndarray(response.outputs[output])
        local = tf.saved_model.load(str(root / name / "1")).signatures["serving_default"]
        expected = local(tiles=tf.constant(tiles))[output].numpy()
        assert served.shape == expected.shape and served.dtype == np.float32
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-7)
    probs = tf.make_ndarray(
        client.run(_request("resnet50", _tiles(2, 64, 64))).outputs["probabilities"]
    )
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_large_batches_pass_the_message_limit(client: Client) -> None:
    tiles = _tiles(24, 256, 256)  # 4.7 MB request: over gRPC's 4 MB default
    request = _request("mitosis", tiles)
    request.output_filter.append("mitosis_map")
    response = client.run(request)
    assert list(response.outputs) == ["mitosis_map"]
    assert tf.make_ndarray(response.outputs["mitosis_map"]).shape == (24, 32, 32)


def test_status_and_metadata(client: Client) -> None:
    assert client.status("resnet50") == {1: AVAILABLE}
    assert client.status("mitosis") == {1: AVAILABLE}

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "resnet50"
    response = client.predict.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    sig = sig_map.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["tiles"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in sig.inputs["tiles"].tensor_shape.dim] == [-1, -1, -1, 3]
    assert [d.size for d in sig.outputs["probabilities"].tensor_shape.dim] == [-1, 3]


def test_tf_serving_status_codes(client: Client) -> None:
    tiles = _tiles(1, 64, 64)
    c = client.code
    assert c(lambda: client.run(_request("nope", tiles))) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest(nope)",
    )
    assert c(lambda: client.run(_request("resnet50", tiles, version=7))) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Specific(resnet50, 7)",
    )
    assert c(lambda: client.run(_request("resnet50", tiles, signature_name="predict"))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        'Serving signature key "predict" not found.',
    )
    assert c(lambda: client.run(_request("", tiles)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, message = c(lambda: client.run(_request("resnet50", tiles, version_label="stable")))
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: stable",
    )

    wrong_name = _request("resnet50", tiles)
    wrong_name.inputs["images"].CopyFrom(wrong_name.inputs.pop("tiles"))
    code, message = c(lambda: client.run(wrong_name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Signature input alias: tiles" in message
    extra = _request("resnet50", tiles)
    extra.inputs["more"].CopyFrom(extra.inputs["tiles"])
    code, message = c(lambda: client.run(extra))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input size does not match" in message
    floats = _request("resnet50", tiles.astype(np.float32))
    assert c(lambda: client.run(floats)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Expects arg[0] to be uint8 but float is provided",
    )
    rank3 = _request("resnet50", tiles[0])
    assert c(lambda: client.run(rank3))[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad_filter = _request("resnet50", tiles)
    bad_filter.output_filter.append("logits")
    code, message = c(lambda: client.run(bad_filter))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "output tensor alias not found" in message

    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = "resnet50"
    assert c(lambda: client.predict.GetModelMetadata(no_field))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert c(lambda: client.status("nope")) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find any versions of model nope",
    )
    no_spec = (
        (client.predict.Predict, predict_pb2.PredictRequest()),
        (
            client.predict.GetModelMetadata,
            get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"]),
        ),
        (client.models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest()),
    )
    for call, request in no_spec:
        assert c(functools.partial(call, request, timeout=10)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "Missing ModelSpec",
        )
    classify = classification_pb2.ClassificationRequest()
    assert c(lambda: client.predict.Classify(classify))[0] == grpc.StatusCode.UNIMPLEMENTED
    # The server keeps serving after every error.
    assert client.run(_request("resnet50", tiles)).model_spec.version.value == 1


def test_new_version_is_served_without_restart(tmp_path: Path) -> None:
    export_untrained(tmp_path, "mitosis", name="det", seed=1)
    server, client = start_server(tmp_path)
    try:
        tiles = _tiles(2, 64, 64)
        first = client.run(_request("det", tiles))
        assert first.model_spec.version.value == 1

        # A half-written version (no saved_model.pb yet) is not a version: still v1.
        (tmp_path / "det" / "7" / "variables").mkdir(parents=True)
        time.sleep(0.6)
        assert client.run(_request("det", tiles)).model_spec.version.value == 1

        new = export_untrained(tmp_path, "mitosis", name="det", seed=2)
        assert new.name == "8"
        wait_for(lambda: client.run(_request("det", tiles)).model_spec.version.value == 8)
        second = client.run(_request("det", tiles))
        assert not np.allclose(
            tf.make_ndarray(first.outputs["mitosis_map"]),
            tf.make_ndarray(second.outputs["mitosis_map"]),
        )
        wait_for(lambda: client.status("det") == {1: END, 8: AVAILABLE})  # latest policy: 1

        # A brand-new model folder is picked up as well.
        export_untrained(tmp_path, "mitosis", name="det2")
        wait_for(lambda: "det2" in server.manager.served)
        assert client.run(_request("det2", tiles)).model_spec.version.value == 1
    finally:
        server.stop()


def test_config_file_version_policies(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for seed in (1, 2, 3):
        export_untrained(root, "mitosis", name="mit", seed=seed)
    config = tmp_path / "models.config"
    config.write_text(
        f"""
        model_config_list {{
          config {{
            name: "pinned"
            base_path: "mit"
            model_platform: "tensorflow"
            model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
            version_labels {{ key: "stable" value: 1 }}
            version_labels {{ key: "canary" value: 2 }}
          }}
          config {{
            name: "everything"
            base_path: "{root / "mit"}"
            model_platform: "tensorflow"
            model_version_policy {{ all {{}} }}
          }}
          config {{
            name: "newest"
            base_path: "mit"
            model_platform: "tensorflow"
            model_version_policy {{ latest {{ num_versions: 1 }} }}
          }}
        }}
        """
    )
    server, client = start_server(root, model_config=config)
    try:
        tiles = _tiles(1, 64, 64)
        version = lambda **spec: client.run(_request(**spec, pixels=tiles)).model_spec.version.value  # noqa: E731
        assert version(model="pinned") == 2  # newest of the specific versions, not 3
        assert version(model="pinned", version_label="stable") == 1
        assert version(model="pinned", version_label="canary") == 2
        assert client.code(lambda: version(model="pinned", version=3))[0] == (
            grpc.StatusCode.NOT_FOUND
        )
        assert client.status("pinned") == {1: AVAILABLE, 2: AVAILABLE}
        assert client.status("everything") == {1: AVAILABLE, 2: AVAILABLE, 3: AVAILABLE}
        assert version(model="everything") == 3 and version(model="everything", version=1) == 1
        assert client.status("newest") == {3: AVAILABLE}
        # Folders not in the config are not served when a config is given.
        assert client.code(lambda: version(model="mit"))[0] == grpc.StatusCode.NOT_FOUND

        # ModelService.HandleReloadConfigRequest swaps the config at runtime.
        new_config = model_server_config_pb2.ModelServerConfig()
        entry = new_config.model_config_list.config.add(name="only", base_path="mit")
        entry.model_version_policy.specific.versions.append(3)
        client.models.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=new_config), timeout=60
        )
        assert version(model="only") == 3
        assert client.code(lambda: version(model="pinned"))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


@pytest.mark.slow
def test_entry_point_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    export_untrained(tmp_path, "mitosis")
    port = free_port()
    env = {
        **os.environ,
        "PROLIF_MODEL_ROOT": str(tmp_path),
        "PROLIF_MODEL_SERVER_PORT": str(port),
        "PROLIF_MODEL_SERVER_REST_PORT": "0",
        "PROLIF_LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prolifscore.modelserver.server"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService")

        def serving() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                status = health.Check(request, timeout=1).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, timeout=90)
        response = Client(port).run(_request("mitosis", _tiles(1, 64, 64)))
        assert response.model_spec.version.value == 1
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
