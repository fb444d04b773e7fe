"""bf16 serving in the deployment: Helm's `modelServer.precision: bf16` and kustomize's
components/cpu-bf16 give TF Serving `--mixed_precision=bfloat16` (the local model server's
PROLIF_MODEL_PRECISION=bf16), on CPU only; any other precision is refused by the schema."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.manifests import K8S_DIR, render_helm

FLAG = "--mixed_precision=bfloat16"


def _tfserving_args(values: dict) -> list[str]:
    render = render_helm("precision", values)
    (deployment,) = [
        d for d in render.of_kind("Deployment") if d["metadata"]["name"].endswith("tfserving")
    ]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_helm_precision_sets_tf_serving_mixed_precision_on_cpu_only() -> None:
    assert FLAG not in _tfserving_args({})
    assert FLAG in _tfserving_args({"modelServer": {"precision": "bf16"}})
    gpu = {"modelServer": {"precision": "bf16", "gpu": {"enabled": True}}}
    assert FLAG not in _tfserving_args(gpu)
    with pytest.raises(Exception, match="precision"):
        render_helm("precision", {"modelServer": {"precision": "fp16"}})


def test_cpu_bf16_component_adds_the_flag_to_tf_serving() -> None:
    path = K8S_DIR / "components" / "cpu-bf16" / "kustomization.yaml"
    component = yaml.safe_load(path.read_text())
    (patch,) = component["patches"]
    assert patch["target"] == {"kind": "Deployment", "name": "prolifscore-tfserving"}
    (op,) = yaml.safe_load(patch["patch"])
    assert op == {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": FLAG}
