"""Version labels from the model config file, as TF Serving serves them (gRPC ModelSpec
.version_label and the REST /labels/ paths, its errors and its rule for moving a label), the
`prolifscore models` commands that edit the file and reload the servers, and scoring that names
a label: promote a version, score, roll back, score, with the versions in the results."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from google.protobuf import text_format  # noqa: E402
from tensorflow_serving.apis import model_management_pb2  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

from prolifscore.cli.main import main  # noqa: E402
from prolifscore.cli.models import read_config, read_history  # noqa: E402
from prolifscore.core.runtime.settings import RuntimeSettings, load  # noqa: E402
from prolifscore.modelserver.server import ModelServer  # noqa: E402
from prolifscore.scoring.config import ScoringSettings  # noqa: E402
from prolifscore.scoring.model_client import ModelError, PredictionClient  # noqa: E402
from prolifscore.scoring.server import ScoringServicer, status_for  # noqa: E402
from prolifscore.v1 import pipeline_pb2 as pb  # noqa: E402
from prolifscore.v1 import scoring_pb2 as spb  # noqa: E402
from tests.modelserving import Client, predict_request, start_server, tiles, wait_for  # noqa: E402
from tests.slides import CMU, SLIDES  # noqa: E402

CONFIG = """# The test's models (this comment survives rewrites).
model_config_list {
  config {
    name: "resnet50"
    base_path: "resnet50"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 } }
    version_labels { key: "stable" value: 1 }
  }
  config {
    name: "mitosis"
    base_path: "mitosis"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
"""


@pytest.fixture
def served(exported_root: Path, tmp_path: Path) -> Iterator[tuple[ModelServer, Client, Path]]:
    """resnet50 v1-v3 and mitosis v1-v3 on disk (copies of one export each), the config above."""
    root = tmp_path / "models"
    for name in ("resnet50", "mitosis"):
        for version in (1, 2, 3):
            shutil.copytree(exported_root / name / "1", root / name / str(version))
    config = tmp_path / "models.config"
    config.write_text(CONFIG)
    server, client = start_server(root, model_config=config)
    yield server, client, config
    server.stop()


def _version(client: Client, model: str, **spec: object) -> int:
    response = client.run(predict_request(model, tiles(1, 32, 32), **spec))
    return response.model_spec.version.value


def test_labels_over_grpc_and_rest(served: tuple[ModelServer, Client, Path]) -> None:
    _, client, _ = served
    assert _version(client, "mitosis", version_label="stable") == 1
    assert _version(client, "mitosis", version_label="canary") == 2
    assert _version(client, "mitosis") == 2  # newest served version
    assert client.code(lambda: _version(client, "mitosis", version_label="beta")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Unrecognized servable version label: beta",
    )
    pixels = tiles(2, 32, 32).tolist()
    expected = tf.make_ndarray(
        client.run(predict_request("mitosis", tiles(2, 32, 32), version_label="canary")).outputs[
            "mitosis_map"
        ]
    )
    code, body = client.http("POST", "/v1/models/mitosis/labels/canary:predict", {"inputs": pixels})
    assert code == 200
    np.testing.assert_allclose(np.asarray(body["outputs"]), expected, rtol=1e-6, atol=1e-7)
    code, meta = client.http("GET", "/v1/models/mitosis/labels/stable/metadata")
    assert code == 200 and meta["model_spec"]["version"] == "1"
    # TF Serving's GetModelStatus ignores the label: every version's status
    code, status = client.http("GET", "/v1/models/mitosis/labels/stable")
    assert code == 200 and [s["version"] for s in status["model_version_status"]] == ["1", "2"]
    assert client.http("POST", "/v1/models/mitosis/labels/beta:predict", {"inputs": pixels}) == (
        400,
        {"error": "Unrecognized servable version label: beta"},
    )


def _reload(client: Client, text: str) -> None:
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    request = model_management_pb2.ReloadConfigRequest(config=config)
    client.models.HandleReloadConfigRequest(request, timeout=60)


def test_a_label_moves_only_to_an_available_version(
    served: tuple[ModelServer, Client, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """TF Serving's rule: moving a label to a version that is not loaded refuses the whole
    config; a new label may name one (requests then get NOT_FOUND until it loads)."""
    _, client, config = served
    moved = CONFIG.replace('key: "canary" value: 2', 'key: "canary" value: 3')
    code, message = client.code(lambda: _reload(client, moved))
    assert (code, message) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "Request to assign label to version 3 of model mitosis, which is not currently "
        "available for inference",
    )
    assert _version(client, "mitosis", version_label="canary") == 2  # old config stands
    config.write_text(moved)  # the same change through the file: refused, old config stands
    wait_for(lambda: any(r.getMessage() == "model config not applied" for r in caplog.records))
    assert _version(client, "mitosis", version_label="canary") == 2

    added = CONFIG.replace(
        'key: "canary" value: 2',
        'key: "canary" value: 2 }\n    version_labels { key: "next" value: 3',
    )
    _reload(client, added)
    assert client.code(lambda: _version(client, "mitosis", version_label="next")) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Specific(mitosis, 3)",
    )


def _models(config: Path, address: str, *args: str) -> int:
    root = config.parent / "models"
    base = ["models", args[0], "--config", str(config), "--model-root", str(root)]
    return main([*base, "--server", address, *args[1:]])


def test_promote_and_rollback_edit_the_file_and_reload_the_server(
    served: tuple[ModelServer, Client, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server, client, config = served
    address = f"127.0.0.1:{server.port}"
    assert _models(config, address, "promote", "canary", "3", "--model", "mitosis") == 0
    assert _version(client, "mitosis", version_label="canary") == 3
    text = config.read_text()
    assert text.startswith("# The test's models (this comment survives rewrites).\n")
    mitosis = next(c for c in read_config(config).model_config_list.config if c.name == "mitosis")
    assert list(mitosis.model_version_policy.specific.versions) == [1, 2, 3]  # 3 added first
    assert dict(mitosis.version_labels) == {"stable": 1, "canary": 3}

    assert _models(config, address, "promote", "stable", "2", "--model", "mitosis") == 0
    assert _version(client, "mitosis", version_label="stable") == 2
    assert _models(config, address, "rollback", "--model", "mitosis") == 0  # the last: stable
    assert _version(client, "mitosis", version_label="stable") == 1
    assert _models(config, address, "rollback", "canary", "--model", "mitosis") == 0
    assert _version(client, "mitosis", version_label="canary") == 2
    assert [(r["op"], r["label"], r["version"], r["previous"]) for r in read_history(config)] == [
        ("promote", "canary", 3, 2),
        ("promote", "stable", 2, 1),
        ("rollback", "stable", 1, 2),
        ("rollback", "canary", 2, 3),
    ]
    capsys.readouterr()
    assert _models(config, address, "rollback", "--model", "mitosis") == 1
    assert "no promotion of mitosis to roll back" in capsys.readouterr().err
    assert _models(config, address, "promote", "stable", "9", "--model", "mitosis") == 1
    assert "mitosis has no version 9" in capsys.readouterr().err

    assert _models(config, address, "list", "--json") == 0
    listed = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["mitosis"]["labels"] == {"canary": 2, "stable": 1}
    assert listed["mitosis"]["on_disk"] == [1, 2, 3]
    assert listed["mitosis"]["served"][address] == {
        "1": "AVAILABLE",
        "2": "AVAILABLE",
        "3": "AVAILABLE",
    }


def test_scoring_names_a_label_promote_score_rollback_score(
    served: tuple[ModelServer, Client, Path], tmp_path: Path
) -> None:
    """The scoring service's default label (PROLIF_TUMOR_MODEL_LABEL) follows promote and
    rollback; a request's model_label wins; the results list the versions used."""
    server, _, config = served
    address = f"127.0.0.1:{server.port}"
    settings = load(
        ScoringSettings,
        environ={},
        runtime=load(RuntimeSettings, environ={}, slide_roots=(SLIDES,)),
        model_server=address,
        tumor_model_label="stable",
        ray_readers=0,
        kafka_enabled=False,
        store_results=False,
        predict_batch=8,
    )
    servicer = ScoringServicer(settings, PredictionClient(address, retries=0))
    request = spb.ScoreRequest(path=str(CMU), spec=pb.TilingSpec(max_tiles=8))

    def versions(**fields: str) -> dict[str, int]:
        asked = spb.ScoreRequest(**fields)
        asked.MergeFrom(request)
        result = servicer.score(asked)
        assert result.tiles_scored > 0
        return {m.name: m.version for m in result.models}

    try:
        assert versions() == {"resnet50": 1, "mitosis": 2}
        assert _models(config, address, "promote", "stable", "2") == 0  # --model: resnet50
        assert versions() == {"resnet50": 2, "mitosis": 2}
        assert _models(config, address, "promote", "canary", "3") == 0
        assert versions(model_label="canary") == {"resnet50": 3, "mitosis": 2}
        assert _models(config, address, "rollback", "stable") == 0
        assert versions() == {"resnet50": 1, "mitosis": 2}
        with pytest.raises(ModelError) as unknown:
            versions(model_label="beta")
        assert status_for(unknown.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert "Unrecognized servable version label: beta" in str(unknown.value)
    finally:
        servicer.models.close()
