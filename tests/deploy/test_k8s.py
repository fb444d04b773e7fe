"""Offline checks of the Kubernetes deployment (k8s/ kustomize overlays, helm/prolifscore chart,
Dockerfile).

Everything runs without a cluster, Docker or network:
- render: `kubectl kustomize` for each overlay, the chart (embedded Helm, helm-python-sdk) with
  default and non-default values, plus `helm lint --strict`;
- validate: every core object with kubernetes-validate --strict against a pinned Kubernetes
  version; Strimzi, KubeRay and KEDA objects with our own minimal CRD checks (their schemas are
  not available offline), with the Kubernetes types embedded in them (pod templates, HPA
  behavior, security contexts, resources, NetworkPolicy peers) validated against the real core
  schemas;
- policy: Pod Security Standards "restricted", resources, probes, pinned images, labels;
- consistency: environment variables, ports, topics, consumer groups, model names and mounts in
  the manifests against what the services' settings read (prolifscore.cli.main.config_rows).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from prolifscore.cli.main import config_rows

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
CHART_DIR = ROOT / "helm" / "prolifscore"
K8S_VERSION = "1.33.0"  # validation schemas and `helm lint --kube-version` are pinned to this
RELEASE = "prolifscore"
HELM_NAMESPACE = "prolifscore"

Obj = dict[str, Any]


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Values of the non-default chart renders: every switch the chart has, flipped.
HELM_CASES: dict[str, Obj | None] = {
    "defaults": None,
    "external-kafka-local-ray-no-keda-tls-gpu": {
        "kafka": {
            "mode": "external",
            "externalBootstrap": "kafka-0.kafka.example:9092,kafka-1.kafka.example:9092",
            "externalPeers": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        },
        "ray": {"enabled": False},
        "keda": {"enabled": False},
        "tls": {"enabled": True, "secretName": "prolifscore-scoring-tls"},
        "modelServer": {"gpu": {"enabled": True}, "replicas": 2},
        "training": {"job": {"gpu": True}, "rayJob": {"gpu": True}},
        "scoring": {"authSecret": "prolifscore-scoring-token", "replicas": 3},
        "image": {"digest": "sha256:" + "0123456789abcdef" * 4},
        "spread": False,
    },
    "bundled-prod-existing-claims": {
        "fullnameOverride": "pscore",
        "kafka": {
            "storage": {"type": "ephemeral", "size": "20Gi"},
            "replicas": 1,
            "replicationFactor": 1,
            "minInsyncReplicas": 1,
        },
        "ray": {"existingAuthSecret": "my-ray-token", "workers": {"replicas": 6}},
        "storage": {"slides": {"existingClaim": "hospital-slides"}},
        "networkPolicy": {"enabled": False},
        "training": {"job": {"enabled": False}, "rayJob": {"gpu": True, "workers": 4}},
        "config": {"extraEnv": {"PROLIF_KAFKA_DELIVERY_TIMEOUT_MS": 3000000}},
        "tiling": {"extraEnv": {"PROLIF_TISSUE_MODE": "seed", "PROLIF_TILING_TASK_CPUS": 0.5}},
    },
}

# Kinds of the operators' CRDs: checked by crd_errors() below (no schema is bundled offline).
CRD_API = {
    "Kafka": "kafka.strimzi.io/v1",
    "KafkaNodePool": "kafka.strimzi.io/v1",
    "KafkaTopic": "kafka.strimzi.io/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}

# Environment variables our containers may carry besides the PROLIF_* settings: Ray reads these
# (prolifscore.core.runtime.ray defaults RAY_AUTH_MODE=token; the token comes from the Secret).
THIRD_PARTY_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
OUR_IMAGES = ("/prolifscore:", "/prolifscore@", "/prolifscore-gpu:", "/prolifscore-gpu@")
SERVICE_COMMANDS = {
    "prolifscore-tiling": "tiling",
    "prolifscore-filtering": "filtering",
    "prolifscore-scoring": "scoring",
    "prolifscore-modelserver": "modelserver",
}
# What each Kafka consumer consumes: (topic variable, consumer-group variable).
CONSUMES = {
    "tiling": ("PROLIF_TOPIC_INGEST", "PROLIF_TILING_GROUP"),
    "filtering": ("PROLIF_TOPIC_TASKS", "PROLIF_FILTERING_GROUP"),
    "scoring": ("PROLIF_TOPIC_SCORE_REQUESTS", "PROLIF_SCORING_GROUP"),
}
RESTRICTED_VOLUME_TYPES = words(
    "configMap csi downwardAPI emptyDir ephemeral persistentVolumeClaim projected secret"
)


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Render:
    name: str
    objects: list[Obj]
    helm_values: Obj | None = None
    is_helm: bool = False
    notes: str = ""

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None and Path("/usr/bin/kubectl").exists():
        found = "/usr/bin/kubectl"
    if found is None:
        pytest.skip("kubectl (kustomize) is not installed")
    return found


def _load_all(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_kustomize(overlay: str) -> Render:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return Render(f"kustomize/{overlay}", _load_all(out))


def render_helm(case: str, values: Obj | None) -> Render:
    import helm_python as helm

    chart = helm.Chart.load(str(CHART_DIR))
    manifests = chart.render(values, name=RELEASE, namespace=HELM_NAMESPACE, is_install=True)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("/NOTES.txt"):
            notes = text
        else:
            objects.extend(_load_all(text))
    return Render(f"helm/{case}", objects, helm_values=values, is_helm=True, notes=notes)


@pytest.fixture(scope="module")
def renders() -> dict[str, Render]:
    """Every render, once for the whole module."""
    result = {f"kustomize/{o}": render_kustomize(o) for o in ("dev", "prod")}
    for case, values in HELM_CASES.items():
        result[f"helm/{case}"] = render_helm(case, values)
    return result


RENDER_NAMES = ["kustomize/dev", "kustomize/prod"] + [f"helm/{c}" for c in HELM_CASES]


@pytest.fixture(params=RENDER_NAMES)
def render(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    return renders[request.param]


# ---------------------------------------------------------------------------------------------
# Helpers over rendered objects


@dataclass
class PodSpec:
    """A pod template found in a workload (Deployment, Job, or a KubeRay group)."""

    where: str
    labels: dict[str, str]
    spec: Obj
    long_running: bool
    extra: dict[str, Any] = field(default_factory=dict)


def pod_specs(render: Render) -> Iterator[PodSpec]:
    for o in render.objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = o["spec"]["template"]
            labels = t["metadata"].get("labels", {})
            yield PodSpec(f"{kind}/{name}", labels, t["spec"], kind != "Job")
        elif kind in ("RayCluster", "RayJob"):
            cluster = o["spec"] if kind == "RayCluster" else o["spec"].get("rayClusterSpec")
            if not cluster:
                continue
            groups = [("head", cluster["headGroupSpec"])]
            groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
            for group, g in groups:
                t = g["template"]
                yield PodSpec(
                    f"{kind}/{name}/{group}",
                    t.get("metadata", {}).get("labels", {}),
                    t["spec"],
                    kind == "RayCluster",
                    {"ray": True, "head": group == "head"},
                )


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def is_ours(container: Obj) -> bool:
    return any(marker in container["image"] for marker in OUR_IMAGES)


def service_of(container: Obj) -> str | None:
    command = container.get("command") or []
    if command and command[0] in SERVICE_COMMANDS:
        return SERVICE_COMMANDS[command[0]]
    if command[:2] == ["prolifscore", "train"]:
        return "training"
    return None


def effective_env(render: Render, container: Obj) -> dict[str, str | None]:
    """Name -> value (None when it comes from a Secret) as the container sees it: envFrom
    ConfigMaps of the same render, then `env` (which wins)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"{container['name']}: only configMapRef envFrom is used"
        cm = render.get("ConfigMap", ref["name"])
        assert cm is not None, f"{render.name}: envFrom names a missing ConfigMap {ref['name']}"
        env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


def matches(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


_UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_UNITS.update({"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40})


def quantity(value: str | int | float) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m, f"not a quantity: {value!r}"
    return float(m.group(1)) * (_UNITS[m.group(2)] if m.group(2) else 1.0)


def dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


@functools.cache
def code_settings() -> dict[str, tuple[str, frozenset[str]]]:
    """PROLIF_* variable -> (default, services that read it), from the services' settings."""
    return {
        var: (default, frozenset(s.strip() for s in used_by.split(",")))
        for var, default, used_by, _doc in config_rows()
    }


def code_default(var: str) -> str:
    return code_settings()[var][0]


def code_topics() -> dict[str, str]:
    """Topic variable -> the code's default topic name."""
    return {
        var: default
        for var, (default, _) in code_settings().items()
        if var.startswith("PROLIF_TOPIC_") and var != "PROLIF_TOPIC_PARTITIONS"
    }


def configmap_file(render: Render, pod: PodSpec, container: Obj, path: str) -> str:
    """Content of a file that a container sees under a ConfigMap volume mount."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
            assert "configMap" in volume, f"{path} is not on a ConfigMap volume"
            cm = render.get("ConfigMap", volume["configMap"]["name"])
            assert cm is not None, f"ConfigMap {volume['configMap']['name']} missing"
            key = path[len(prefix) :]
            assert key in cm["data"], f"{path}: ConfigMap has no key {key}"
            return str(cm["data"][key])
    raise AssertionError(f"{pod.where}: {path} is not mounted")


def mount_for(container: Obj, path: str) -> Obj | None:
    """The volume mount a path lives on (longest mount path prefix)."""
    best: Obj | None = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if (path == mp or path.startswith(mp + "/")) and (
            best is None or len(mp) > len(best["mountPath"])
        ):
            best = m
    return best


def volume_of(pod: PodSpec, mount: Obj) -> Obj:
    return next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])


def the_pod(render: Render, component: str) -> tuple[PodSpec, Obj]:
    found = [
        (p, p.spec["containers"][0])
        for p in pod_specs(render)
        if p.labels.get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{render.name}: expected one {component} workload, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Render + lint


def test_every_render_has_the_system(render: Render) -> None:
    kinds = {o["kind"] for o in render.objects}
    for component in ("tiling", "filtering", "scoring", "model-server"):
        the_pod(render, component)
    assert {"Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"} <= kinds
    values = render.helm_values or {}
    bundled = dig(values, "kafka.mode") != "external"
    assert ({"Kafka", "KafkaNodePool", "KafkaTopic"} <= kinds) == bundled
    assert ("RayCluster" in kinds) == (dig(values, "ray.enabled") is not False)
    assert ("RayJob" in kinds) == (dig(values, "ray.enabled") is not False)
    assert ("ScaledObject" in kinds) == (dig(values, "keda.enabled") is not False)
    assert ("NetworkPolicy" in kinds) == (dig(values, "networkPolicy.enabled") is not False)
    assert ("Job" in kinds) == (dig(values, "training.job.enabled") is not False)
    names = [(o["kind"], o["metadata"]["name"]) for o in render.objects]
    assert len(names) == len(set(names)), f"duplicate objects in {render.name}"


@pytest.mark.parametrize("case", list(HELM_CASES))
def test_helm_lint_strict(case: str) -> None:
    import helm_python as helm

    report = helm.lint(
        str(CHART_DIR), HELM_CASES[case], strict=True, kube_version=f"v{K8S_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("case", list(HELM_CASES))
def test_helm_notes(case: str, renders: dict[str, Render]) -> None:
    """NOTES.txt renders for every value set and names objects this release really has."""
    render = renders[f"helm/{case}"]
    notes = render.notes
    assert f'release "{RELEASE}"' in notes and f"-n {HELM_NAMESPACE}" in notes
    for kind, name in re.findall(r"kubectl -n \S+ patch (job|rayjob) (\S+)", notes):
        kind = {"job": "Job", "rayjob": "RayJob"}[kind]
        assert render.get(kind, name) is not None, f"NOTES patches a missing {kind}/{name}"
        assert render.get(kind, name)["spec"]["suspend"] is True
    patched = set(re.findall(r"patch (job|rayjob) ", notes))
    assert ("job" in patched) == bool(render.of_kind("Job"))
    assert ("rayjob" in patched) == bool(render.of_kind("RayJob"))
    services = re.findall(r"port-forward svc/(\S+) (\d+):(\d+)", notes)
    assert services, "NOTES says how to reach the scoring API"
    for name, _, port in services:
        svc = render.get("Service", name)
        assert svc is not None and int(port) in {p["port"] for p in svc["spec"]["ports"]}
    env = effective_env(render, the_pod(render, "tiling")[1])
    assert f"Kafka ({env['PROLIF_KAFKA_BOOTSTRAP']})" in notes
    for claim in re.findall(r"PVC (\S+)\)", notes) + re.findall(r"PVC (\S+) \(", notes):
        existing = {
            s.get("existingClaim")
            for s in (dig(render.helm_values or {}, "storage") or {}).values()
        }
        assert render.get("PersistentVolumeClaim", claim) is not None or claim in existing, claim
    for kind in ("kafka", "raycluster", "scaledobject"):
        shown = f"get {kind}" in notes
        rendered = {"kafka": "Kafka", "raycluster": "RayCluster", "scaledobject": "ScaledObject"}[
            kind
        ]
        assert shown == bool(render.of_kind(rendered)), kind
    assert "lands with" not in notes, "stale text"


@pytest.mark.parametrize(
    "values",
    [
        {"image": {"tag": "latest"}},
        {"kafka": {"mode": "kraft"}},
        {"unknownKey": 1},
        {"config": {"extraEnv": {"NOT_PROLIF": "x"}}},
        {"modelServer": {"models": {"tumor": "Bad Name"}}},
        {"tls": {"enabled": True}},  # TLS on without its Secret would silently serve plaintext
        {"tls": {"enabled": True, "secretName": ""}},
    ],
)
def test_helm_values_schema_rejects(values: Obj) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError):
        helm.Chart.load(str(CHART_DIR)).validate_schema(values)


def test_helm_refuses_inconsistent_values() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match="externalBootstrap"):
        render_helm("x", {"kafka": {"mode": "external", "externalPeers": [{"podSelector": {}}]}})
    with pytest.raises(helm.HelmError, match="replicationFactor"):
        render_helm("x", {"kafka": {"replicas": 1}})


# ---------------------------------------------------------------------------------------------
# Schema validation


@pytest.fixture(scope="module")
def k8s_validate() -> Iterator[Callable[[Obj], str]]:
    """kubernetes_validate.validate, strict, pinned version, with its schema files cached (it
    re-reads the 1.4 MB definitions file for every object otherwise)."""
    import kubernetes_validate
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    try:
        yield lambda obj: kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    finally:
        utils.schema_contents = original


def test_core_objects_validate_strict(render: Render, k8s_validate: Callable[[Obj], str]) -> None:
    import kubernetes_validate

    failures = []
    for o in render.objects:
        if o["kind"] in CRD_API:
            continue
        try:
            k8s_validate(o)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{o['kind']}/{o['metadata']['name']}: no schema ({e})")
    assert not failures, "\n".join(failures)


def _pod_template(spec: Obj, labels: dict[str, str] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "embedded"},
        "template": {"metadata": {"labels": labels or {}}, "spec": spec},
    }


def _check_keys(
    where: str, obj: Obj, allowed: Collection[str], required: Collection[str] = ()
) -> list[str]:
    errors = [f"{where}: unknown field {k!r}" for k in obj if k not in allowed]
    errors += [f"{where}: missing required field {k!r}" for k in required if k not in obj]
    return errors


# Field names from the operators' CRDs / API references (KubeRay v1.6, KEDA 2.x, Strimzi v1).
RAY_CLUSTER_SPEC = words(
    "authOptions autoscalerOptions enableInTreeAutoscaling gcsFaultToleranceOptions "
    "headGroupSpec headServiceAnnotations managedBy rayVersion suspend upgradeStrategy "
    "workerGroupSpecs"
)
RAY_HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
RAY_WORKER_GROUP = words(
    "groupName idleTimeoutSeconds maxReplicas minReplicas numOfHosts rayStartParams "
    "replicas scaleStrategy suspend template"
)
RAY_JOB_SPEC = words(
    "activeDeadlineSeconds backoffLimit clusterSelector deletionStrategy entrypoint "
    "entrypointNumCpus entrypointNumGpus entrypointResources jobId managedBy metadata "
    "rayClusterSpec runtimeEnvYAML shutdownAfterJobFinishes submissionMode "
    "submitterConfig submitterPodTemplate suspend ttlSecondsAfterFinished"
)
KEDA_SPEC = words(
    "advanced cooldownPeriod fallback idleReplicaCount initialCooldownPeriod "
    "maxReplicaCount minReplicaCount pollingInterval scaleTargetRef triggers"
)
KEDA_KAFKA_METADATA = words(
    "activationLagThreshold allowIdleConsumers bootstrapServers consumerGroup "
    "ensureEvenDistributionOfPartitions excludePersistentLag lagThreshold "
    "limitToPartitionsWithLag offsetResetPolicy partitionLimitation sasl "
    "scaleToZeroOnInvalidOffset tls topic unsafeSsl version"
)
KAFKA_SPEC = words(
    "clientsCa clusterCa cruiseControl entityOperator kafka kafkaExporter maintenanceTimeWindows"
)
KAFKA_KAFKA = words(
    "authorization brokerRackInitImage config image jmxOptions jvmOptions listeners "
    "livenessProbe logging metadataVersion metricsConfig quotas rack readinessProbe "
    "resources template tieredStorage version"
)
KAFKA_LISTENER = {
    "authentication",
    "configuration",
    "name",
    "networkPolicyPeers",
    "port",
    "tls",
    "type",
}
NODE_POOL_SPEC = {"jvmOptions", "replicas", "resources", "roles", "storage", "template"}


def _ray_cluster_errors(where: str, spec: Obj, validate: Callable[[Obj], str]) -> list[str]:
    errors = _check_keys(where, spec, RAY_CLUSTER_SPEC, {"headGroupSpec"})
    auth = spec.get("authOptions")
    if auth is not None:
        errors += _check_keys(
            f"{where}.authOptions", auth, {"mode", "secretName", "enableK8sTokenAuth"}
        )
        if auth.get("mode") not in ("disabled", "token"):
            errors.append(f"{where}.authOptions.mode: {auth.get('mode')!r}")
    head = spec["headGroupSpec"]
    errors += _check_keys(
        f"{where}.headGroupSpec", head, RAY_HEAD_GROUP, {"template", "rayStartParams"}
    )
    groups = [("headGroupSpec", head)]
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        errors += _check_keys(w, g, RAY_WORKER_GROUP, {"groupName", "template", "rayStartParams"})
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31):
            errors.append(f"{w}: replicas outside [minReplicas, maxReplicas]")
        groups.append((f"workerGroupSpecs[{i}]", g))
    for name, g in groups:
        if not all(isinstance(v, str) for v in g["rayStartParams"].values()):
            errors.append(f"{where}.{name}.rayStartParams: values must be strings")
        t = g["template"]
        # the embedded pod template against the real core schema
        validate(_pod_template(t["spec"], t.get("metadata", {}).get("labels")))
    return errors


def _one_container_pod(
    pod_security: Obj | None, name: str, security: Obj | None, resources: Obj | None
) -> Obj:
    """A PodTemplate wrapping fragments of an operator resource that are core Kubernetes types
    (pod / container security contexts, resources), so the core schema validates them."""
    container = {"name": name, "image": "x", "securityContext": security or {}}
    container["resources"] = resources or {}
    return _pod_template({"securityContext": pod_security or {}, "containers": [container]})


def _netpol_with_peer(peer: Obj) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "embedded"},
        "spec": {"podSelector": {}, "ingress": [{"from": [peer]}]},
    }


Validate = Callable[[Obj], str]
LISTENER_TYPES = ("internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def _kafka_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = _check_keys(where, spec, KAFKA_SPEC, {"kafka"})
    errors += _check_keys(f"{where}.kafka", spec["kafka"], KAFKA_KAFKA, {"listeners"})
    for i, lst in enumerate(spec["kafka"]["listeners"]):
        w = f"{where}.kafka.listeners[{i}]"
        errors += _check_keys(w, lst, KAFKA_LISTENER, {"name", "port", "type", "tls"})
        if not re.fullmatch(r"[a-z0-9]{1,11}", lst["name"]):
            errors.append(f"{w}.name")
        if lst["port"] < 9092 or lst["port"] in (9404, 9999):
            errors.append(f"{w}.port {lst['port']} is reserved")
        if lst["type"] not in LISTENER_TYPES:
            errors.append(f"{w}.type")
        for peer in lst.get("networkPolicyPeers", []):
            validate(_netpol_with_peer(peer))
    eo = spec.get("entityOperator", {})
    errors += _check_keys(
        f"{where}.entityOperator", eo, {"topicOperator", "userOperator", "template"}
    )
    validate(
        _one_container_pod(
            dig(eo, "template.pod.securityContext"),
            "topic-operator",
            dig(eo, "template.topicOperatorContainer.securityContext"),
            dig(eo, "topicOperator.resources"),
        )
    )
    return errors


def _node_pool_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = _check_keys(where, spec, NODE_POOL_SPEC, {"replicas", "roles", "storage"})
    if not spec["roles"] or not set(spec["roles"]) <= {"controller", "broker"}:
        errors.append(f"{where}.roles")
    storage = spec["storage"]
    if storage["type"] not in ("jbod", "ephemeral", "persistent-claim"):
        errors.append(f"{where}.storage.type")
    for v in storage.get("volumes", []):
        if v.get("type") not in ("ephemeral", "persistent-claim") or "id" not in v:
            errors.append(f"{where}.storage.volumes: {v}")
    validate(
        _one_container_pod(
            dig(spec, "template.pod.securityContext"),
            "kafka",
            dig(spec, "template.kafkaContainer.securityContext"),
            spec.get("resources"),
        )
    )
    return errors


def _topic_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = _check_keys(where, spec, {"topicName", "partitions", "replicas", "config"})
    if not (isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1):
        errors.append(f"{where}.partitions")
    replicas = spec.get("replicas", 1)  # optional: the broker default
    if not (isinstance(replicas, int) and 1 <= replicas <= 32767):
        errors.append(f"{where}.replicas")
    return errors


def _ray_job_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = _check_keys(where, spec, RAY_JOB_SPEC)
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode")
    if not spec.get("entrypoint"):
        errors.append(f"{where}: no entrypoint")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append(f"{where}: exactly one of rayClusterSpec / clusterSelector")
    if "rayClusterSpec" in spec:
        errors += _ray_cluster_errors(f"{where}.rayClusterSpec", spec["rayClusterSpec"], validate)
    return errors


def _scaled_object_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = _check_keys(where, spec, KEDA_SPEC, {"scaleTargetRef", "triggers"})
    target_keys = {"apiVersion", "kind", "name", "envSourceContainerName"}
    errors += _check_keys(f"{where}.scaleTargetRef", spec["scaleTargetRef"], target_keys, {"name"})
    if not spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100):
        errors.append(f"{where}: minReplicaCount > maxReplicaCount")
    trigger_keys = {
        "type",
        "metadata",
        "name",
        "authenticationRef",
        "metricType",
        "useCachedMetrics",
    }
    for i, trig in enumerate(spec["triggers"]):
        w = f"{where}.triggers[{i}]"
        errors += _check_keys(w, trig, trigger_keys, {"type", "metadata"})
        if not all(isinstance(v, str) for v in trig["metadata"].values()):
            errors.append(f"{w}.metadata: values must be strings")
        if trig["type"] == "kafka":
            md = trig["metadata"]
            required = {"bootstrapServers", "consumerGroup", "topic"}
            errors += _check_keys(f"{w}.metadata", md, KEDA_KAFKA_METADATA, required)
            if md.get("offsetResetPolicy", "latest") not in ("earliest", "latest"):
                errors.append(f"{w}.offsetResetPolicy")
    behavior = dig(spec, "advanced.horizontalPodAutoscalerConfig.behavior")
    if behavior:
        hpa_spec = {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1}
        validate(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "embedded"},
                "spec": {**hpa_spec, "behavior": behavior},
            }
        )
    return errors


CRD_CHECKS: dict[str, Callable[[str, Obj, Validate], list[str]]] = {
    "Kafka": _kafka_errors,
    "KafkaNodePool": _node_pool_errors,
    "KafkaTopic": _topic_errors,
    "RayCluster": _ray_cluster_errors,
    "RayJob": _ray_job_errors,
    "ScaledObject": _scaled_object_errors,
}


def crd_errors(o: Obj, validate: Validate) -> list[str]:
    """Our minimal CRD validation: API version, kind, name, required and known fields, enums
    (from the operators' CRDs); embedded core types go to the real schema via `validate`."""
    kind, name = o["kind"], o["metadata"]["name"]
    where = f"{kind}/{name}"
    errors: list[str] = []
    if o["apiVersion"] != CRD_API[kind]:
        errors.append(f"{where}: apiVersion {o['apiVersion']} (expected {CRD_API[kind]})")
    errors += _check_keys(
        where, o, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"}
    )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        errors.append(f"{where}: invalid name")
    if kind in ("KafkaNodePool", "KafkaTopic") and "strimzi.io/cluster" not in o["metadata"].get(
        "labels", {}
    ):
        errors.append(f"{where}: missing label strimzi.io/cluster")
    return errors + CRD_CHECKS[kind](f"{where}.spec", o["spec"], validate)


def test_operator_resources_minimal_crd_checks(
    render: Render, k8s_validate: Callable[[Obj], str]
) -> None:
    import kubernetes_validate

    errors: list[str] = []
    for o in render.objects:
        if o["kind"] not in CRD_API:
            continue
        try:
            errors += crd_errors(o, k8s_validate)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(
                f"{o['kind']}/{o['metadata']['name']} (embedded core type) {path}: {e.message}"
            )
    assert not errors, "\n".join(errors)


def test_crd_checks_catch_mistakes(k8s_validate: Callable[[Obj], str]) -> None:
    bad_topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t"},
        "spec": {"partitions": 0, "replica": 3},
    }
    assert len(crd_errors(bad_topic, k8s_validate)) == 3  # label, unknown field, partitions
    bad_so = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "s"},
        "spec": {
            "scaleTargetRef": {"name": "d"},
            "triggers": [{"type": "kafka", "metadata": {"bootstrapServer": "k:9092"}}],
        },
    }
    errors = crd_errors(bad_so, k8s_validate)
    assert any("bootstrapServer'" in e for e in errors) and any("topic" in e for e in errors)


# ---------------------------------------------------------------------------------------------
# Policy


def test_pods_meet_restricted_pod_security(render: Render) -> None:
    errors: list[str] = []
    for pod in pod_specs(render):
        spec, w = pod.spec, pod.where
        psc = spec.get("securityContext", {})
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(forbidden):
                errors.append(f"{w}: {forbidden}")
        if spec.get("automountServiceAccountToken") is not False:
            errors.append(f"{w}: mounts a service account token")
        if not spec.get("serviceAccountName"):
            errors.append(f"{w}: no serviceAccountName")
        for v in spec.get("volumes", []):
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUME_TYPES:
                errors.append(f"{w}: volume {v['name']} of type {kinds}")
        for c in containers(spec):
            cw = f"{w}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cw}: allowPrivilegeEscalation")
            if sc.get("privileged"):
                errors.append(f"{cw}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{cw}: root file system is writable")
            if "ALL" not in dig(sc, "capabilities.drop") or dig(sc, "capabilities.add"):
                errors.append(f"{cw}: capabilities not all dropped")
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) or sc.get("runAsUser") == 0:
                errors.append(f"{cw}: may run as root")
            seccomp = dig(sc, "seccompProfile.type") or dig(psc, "seccompProfile.type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errors.append(f"{cw}: seccompProfile")
            # read-only root: the writable scratch space is an emptyDir on /tmp
            tmp = mount_for(c, "/tmp/x")
            if tmp is None or "emptyDir" not in next(
                v for v in spec["volumes"] if v["name"] == tmp["name"]
            ):
                errors.append(f"{cw}: /tmp is not an emptyDir")
    assert not errors, "\n".join(errors)


def strimzi_containers(render: Render) -> Iterator[tuple[str, Obj, Obj]]:
    """(where, pod securityContext, container securityContext) of every container Strimzi will
    run for the rendered Kafka resources: the brokers/controllers of each node pool (the pool's
    template, else the Kafka's), and each optional component that is switched on."""
    for kafka in render.of_kind("Kafka"):
        name, spec = kafka["metadata"]["name"], kafka["spec"]
        pools = [
            p
            for p in render.of_kind("KafkaNodePool")
            if p["metadata"]["labels"].get("strimzi.io/cluster") == name
        ]
        assert pools, f"Kafka/{name}: KRaft needs a KafkaNodePool"
        for pool in pools:
            template = pool["spec"].get("template") or dig(spec, "kafka.template") or {}
            yield (
                f"KafkaNodePool/{pool['metadata']['name']}/kafka",
                dig(template, "pod.securityContext") or {},
                dig(template, "kafkaContainer.securityContext") or {},
            )
        eo = spec.get("entityOperator")
        if eo:
            for operator in ("topicOperator", "userOperator"):
                if operator in eo:
                    yield (
                        f"Kafka/{name}/entityOperator/{operator}",
                        dig(eo, "template.pod.securityContext") or {},
                        dig(eo, f"template.{operator}Container.securityContext") or {},
                    )
        for component, container in (
            ("cruiseControl", "cruiseControlContainer"),
            ("kafkaExporter", "container"),
        ):
            if component in spec:
                yield (
                    f"Kafka/{name}/{component}",
                    dig(spec[component], "template.pod.securityContext") or {},
                    dig(spec[component], f"template.{container}.securityContext") or {},
                )


def test_strimzi_pods_meet_restricted_pod_security(render: Render) -> None:
    """The issue's security settings hold for every pod, the operator-made Kafka pods included:
    their security contexts come only from the Strimzi templates in our resources."""
    errors: list[str] = []
    found = 0
    for where, psc, sc in strimzi_containers(render):
        found += 1
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            errors.append(f"{where}: may run as root")
        if (dig(sc, "seccompProfile.type") or dig(psc, "seccompProfile.type")) != "RuntimeDefault":
            errors.append(f"{where}: seccompProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation")
        if "ALL" not in (dig(sc, "capabilities.drop") or []) or dig(sc, "capabilities.add"):
            errors.append(f"{where}: capabilities not all dropped")
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{where}: root file system is writable")
    assert not errors, "\n".join(errors)
    assert bool(found) == bool(render.of_kind("Kafka"))


def test_namespace_and_service_accounts(render: Render) -> None:
    for ns in render.of_kind("Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    if not render.is_helm:
        assert render.of_kind("Namespace"), "the kustomize base creates its namespace"
    accounts = {sa["metadata"]["name"]: sa for sa in render.of_kind("ServiceAccount")}
    for sa in accounts.values():
        assert sa["automountServiceAccountToken"] is False
    for pod in pod_specs(render):
        assert pod.spec["serviceAccountName"] in accounts, pod.where


def test_resources_requests_and_limits(render: Render) -> None:
    errors: list[str] = []
    for pod in pod_specs(render):
        for c in containers(pod.spec):
            res = c.get("resources", {})
            for r in ("cpu", "memory"):
                req, lim = dig(res, f"requests.{r}"), dig(res, f"limits.{r}")
                if req is None or lim is None:
                    errors.append(f"{pod.where}/{c['name']}: no {r} request/limit")
                elif quantity(lim) < quantity(req):
                    errors.append(f"{pod.where}/{c['name']}: {r} limit < request")
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus is not None:
                assert res["requests"].get("nvidia.com/gpu") == gpus, pod.where
                assert "nvidia.com/gpu.present" in pod.spec.get("nodeSelector", {}), pod.where
    for node_pool in render.of_kind("KafkaNodePool"):
        assert {"requests", "limits"} <= set(node_pool["spec"]["resources"])
    assert not errors, "\n".join(errors)


def test_gpu_placement(renders: dict[str, Render]) -> None:
    def gpu(pod: PodSpec) -> bool:
        return any(
            "nvidia.com/gpu" in (dig(c, "resources.limits") or {}) for c in pod.spec["containers"]
        )

    prod = renders["kustomize/prod"]
    tf_pod, tf = the_pod(prod, "model-server")
    assert gpu(tf_pod) and tf["image"].endswith("-gpu")
    assert tf_pod.spec["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    job = next(p for p in pod_specs(prod) if p.where.startswith("Job/"))
    assert gpu(job) and "/prolifscore-gpu:" in job.spec["containers"][0]["image"]
    ray_train = [
        p for p in pod_specs(prod) if p.where.startswith("RayJob/") and not p.extra["head"]
    ]
    assert ray_train and all(gpu(p) for p in ray_train)
    assert not any(gpu(p) for p in pod_specs(renders["kustomize/dev"]))
    helm_gpu = renders["helm/external-kafka-local-ray-no-keda-tls-gpu"]
    assert gpu(the_pod(helm_gpu, "model-server")[0])
    assert not any(gpu(p) for p in pod_specs(renders["helm/defaults"]))


def test_probes(render: Render) -> None:
    errors: list[str] = []
    for pod in pod_specs(render):
        if not pod.long_running:
            continue
        for c in pod.spec["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    errors.append(f"{pod.where}/{c['name']}: no {probe}")
            component = pod.labels.get("app.kubernetes.io/component")
            if component in ("tiling", "filtering", "scoring"):
                grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    check = c[probe].get("grpc") or c[probe].get("tcpSocket")
                    if not check or check["port"] != grpc_port:
                        errors.append(f"{pod.where}: {probe} not on the gRPC port {grpc_port}")
                    if "tcpSocket" in c[probe] and not effective_env(render, c).get(
                        "PROLIF_TLS_CERT_FILE"
                    ):
                        errors.append(
                            f"{pod.where}: TCP {probe} without TLS (use the gRPC health check)"
                        )
    assert not errors, "\n".join(errors)


def test_images_are_pinned(render: Render) -> None:
    for pod in pod_specs(render):
        for c in containers(pod.spec):
            image = c["image"]
            name, _, digest = image.partition("@")
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
            assert tag or digest, f"{pod.where}: {image} has no tag or digest"
            assert tag != "latest", f"{pod.where}: {image} uses latest"
            assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image


def test_recommended_labels(render: Render) -> None:
    required = {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
    }
    if render.is_helm:
        required.add("helm.sh/chart")
    for o in render.objects:
        missing = required - set(o["metadata"].get("labels", {}))
        assert not missing, f"{render.name}: {o['kind']}/{o['metadata']['name']} lacks {missing}"
    for pod in pod_specs(render):
        for label in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        ):
            assert label in pod.labels, f"{pod.where}: pod template lacks {label}"
    for d in render.of_kind("Deployment"):
        selector = d["spec"]["selector"]["matchLabels"]
        assert "app.kubernetes.io/version" not in selector, "selectors are immutable: no version"
        assert matches(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])


def test_services_and_disruption_budgets_select_workloads(render: Render) -> None:
    pods = list(pod_specs(render))
    for svc in render.of_kind("Service"):
        selected = [p for p in pods if matches({"matchLabels": svc["spec"]["selector"]}, p.labels)]
        assert selected, f"{render.name}: Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            names = {
                cp.get("name")
                for p in selected
                for c in p.spec["containers"]
                for cp in c.get("ports", [])
            }
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port}"
    for d in render.of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert any(
            matches(pdb["spec"]["selector"], labels)
            for pdb in render.of_kind("PodDisruptionBudget")
        ), f"{render.name}: no PodDisruptionBudget for {d['metadata']['name']}"


def test_network_policies(render: Render) -> None:
    policies = render.of_kind("NetworkPolicy")
    if not policies:
        assert dig(render.helm_values or {}, "networkPolicy.enabled") is False
        return
    pods = list(pod_specs(render))
    deny = [p for p in policies if not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for pod in pods:
        assert matches(deny[0]["spec"]["podSelector"], pod.labels), (
            f"{pod.where} is not default-deny"
        )
    # every port an ingress rule opens is a port the selected pods listen on
    for pol in policies:
        selected = [p for p in pods if matches(pol["spec"]["podSelector"], p.labels)]
        listening = {
            port["containerPort"]
            for p in selected
            for c in p.spec["containers"]
            for port in c.get("ports", [])
        }
        for rule in pol["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert port["port"] in listening, (
                    f"{pol['metadata']['name']}: nothing listens on {port}"
                )

    # the flows of the data-flow diagram are open (egress side)
    def egress_ports(component: str) -> set[int]:
        labels = next(
            p.labels for p in pods if p.labels.get("app.kubernetes.io/component") == component
        )
        return {
            port["port"]
            for pol in policies
            if matches(pol["spec"]["podSelector"], labels)
            for rule in pol["spec"].get("egress", [])
            for port in rule.get("ports", [])
        }

    for component in ("tiling", "filtering", "scoring"):
        ports = egress_ports(component)
        assert 53 in ports and (
            9092 in ports or dig(render.helm_values or {}, "kafka.externalPorts")
        ), component
        if render.of_kind("RayCluster"):
            assert 10001 in ports, component
    assert 8500 in egress_ports("scoring")


# ---------------------------------------------------------------------------------------------
# Consistency with the code


def test_env_vars_are_settings_the_services_read(render: Render) -> None:
    known = code_settings()
    errors: list[str] = []
    for pod in pod_specs(render):
        for c in containers(pod.spec):
            if not is_ours(c):
                continue
            service = service_of(c)
            if pod.labels.get("app.kubernetes.io/component") == "training-ray-head":
                service = "training"  # the RayJob's driver runs `prolifscore train` here
            for var in effective_env(render, c):
                if var in THIRD_PARTY_ENV:
                    continue
                if var not in known:
                    errors.append(f"{pod.where}/{c['name']}: {var} is read by no service")
                elif (
                    service in {s for _, services in known.values() for s in services}
                    and service not in known[var][1]
                ):
                    errors.append(
                        f"{pod.where}: {var} is not read by {service} (only {known[var][1]})"
                    )
    for cm in render.of_kind("ConfigMap"):
        for key in cm.get("data", {}):
            if key.startswith("PROLIF") and key not in known:
                errors.append(f"ConfigMap {cm['metadata']['name']}: {key} is read by no service")
    assert not errors, "\n".join(errors)


def test_ports_bind_host_and_grace(render: Render) -> None:
    for component in ("tiling", "filtering", "scoring"):
        pod, c = the_pod(render, component)
        env = effective_env(render, c)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert env["PROLIF_BIND_HOST"] == "0.0.0.0", (
            "127.0.0.1 would be unreachable from the Service"
        )
        port_var = "PROLIF_SCORING_PORT" if component == "scoring" else "PROLIF_GRPC_PORT"
        assert int(env[port_var] or 0) == ports["grpc"], component
        assert int(env["PROLIF_METRICS_PORT"] or 0) == ports["metrics"], component
        if component == "scoring":
            assert int(env["PROLIF_SCORING_PORT"] or 0) == ports["grpc"]
            default_port = int(code_settings()["PROLIF_SCORING_PORT"][0])
            assert ports["grpc"] == default_port, "clients expect the well-known scoring port"
        grace = float(
            env.get("PROLIF_SHUTDOWN_GRACE_S") or code_settings()["PROLIF_SHUTDOWN_GRACE_S"][0]
        )
        assert pod.spec["terminationGracePeriodSeconds"] > grace, component


def test_addresses_point_at_rendered_services(render: Render) -> None:
    _, scoring = the_pod(render, "scoring")
    env = effective_env(render, scoring)
    # model server address -> the TF Serving Service -> the TF Serving container's gRPC port
    host, port = (env["PROLIF_MODEL_SERVER"] or "").rsplit(":", 1)
    svc = render.get("Service", host.split(".")[0])
    assert svc is not None, f"{render.name}: PROLIF_MODEL_SERVER names no Service"
    svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    tf_pod, tf = the_pod(render, "model-server")
    assert matches({"matchLabels": svc["spec"]["selector"]}, tf_pod.labels)
    assert {"name": svc_port["targetPort"], "containerPort": int(port)} in tf["ports"]
    assert f"--port={port}" in tf["args"]
    # Ray address -> the RayCluster head service, or a local Ray with shared memory
    for component in ("tiling", "filtering", "scoring"):
        _, c = the_pod(render, component)
        ray = effective_env(render, c)["PROLIF_RAY_ADDRESS"] or ""
        clusters = render.of_kind("RayCluster")
        if clusters:
            assert ray == f"ray://{clusters[0]['metadata']['name']}-head-svc:10001", component
            head = clusters[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert 10001 in {p["containerPort"] for p in head["ports"]}
        else:
            assert ray == "", component
            shm = mount_for(c, "/dev/shm")
            assert shm is not None, f"{component}: local Ray needs /dev/shm"
    # Ray token: the services send the Secret the Ray cluster uses
    for kind in ("RayCluster", "RayJob"):
        for o in render.of_kind(kind):
            cluster = o["spec"] if kind == "RayCluster" else o["spec"]["rayClusterSpec"]
            secret = cluster["authOptions"]["secretName"]
            if render.is_helm and not dig(render.helm_values or {}, "ray.existingAuthSecret"):
                assert render.get("Secret", secret) is not None, f"{secret} is not rendered"
            for component in ("tiling", "filtering", "scoring"):
                _, c = the_pod(render, component)
                token = next(e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN")
                assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


def test_kafka_bootstrap_topics_and_sizes(render: Render) -> None:
    _, tiling = the_pod(render, "tiling")
    env = effective_env(render, tiling)
    bootstrap = env["PROLIF_KAFKA_BOOTSTRAP"] or ""
    expected_topics = code_topics()
    for component in ("tiling", "filtering", "scoring"):
        cenv = effective_env(render, the_pod(render, component)[1])
        for var, default in expected_topics.items():
            if var in cenv:
                assert cenv[var] == default, (
                    f"{component}: {var}={cenv[var]} but the code says {default}"
                )
        assert cenv["PROLIF_KAFKA_BOOTSTRAP"] == bootstrap
    kafkas = render.of_kind("Kafka")
    if kafkas:
        kafka = kafkas[0]
        namespace = kafka["metadata"].get("namespace", HELM_NAMESPACE)
        listener = next(lst for lst in kafka["spec"]["kafka"]["listeners"] if not lst["tls"])
        assert (
            bootstrap
            == f"{kafka['metadata']['name']}-kafka-bootstrap.{namespace}.svc:{listener['port']}"
        )
        topics = {t["spec"]["topicName"]: t for t in render.of_kind("KafkaTopic")}
        assert set(topics) == set(expected_topics.values()), "one KafkaTopic per topic of the code"
        max_request = int(
            env.get("PROLIF_KAFKA_MAX_REQUEST_SIZE")
            or code_settings()["PROLIF_KAFKA_MAX_REQUEST_SIZE"][0]
        )
        assert int(kafka["spec"]["kafka"]["config"]["message.max.bytes"]) >= max_request
        assert int(kafka["spec"]["kafka"]["config"]["replica.fetch.max.bytes"]) >= max_request
        pools = [
            p
            for p in render.of_kind("KafkaNodePool")
            if p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        ]
        brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
        for topic in topics.values():
            assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
            assert int(topic["spec"]["config"]["max.message.bytes"]) >= max_request
            assert topic["spec"]["replicas"] <= brokers
            assert int(topic["spec"]["config"]["min.insync.replicas"]) <= topic["spec"]["replicas"]
    # KEDA scales each consumer on the group and topic it really consumes
    for so in render.of_kind("ScaledObject"):
        target = render.get("Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert target is not None and "replicas" not in target["spec"], "KEDA owns the replicas"
        component = target["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        cenv = effective_env(render, target["spec"]["template"]["spec"]["containers"][0])
        topic_var, group_var = CONSUMES[component]
        md = so["spec"]["triggers"][0]["metadata"]
        assert md["bootstrapServers"] == bootstrap
        assert md["topic"] == (cenv.get(topic_var) or code_settings()[topic_var][0])
        assert md["consumerGroup"] == (cenv.get(group_var) or code_settings()[group_var][0])
        topic = next(
            (t for t in render.of_kind("KafkaTopic") if t["spec"]["topicName"] == md["topic"]), None
        )
        if topic is not None:
            assert so["spec"]["maxReplicaCount"] <= topic["spec"]["partitions"], "idle consumers"


def _text_proto_fields(text: str) -> dict[str, int]:
    fields = dict(re.findall(r"^\s*([a-z_]+)\s*\{\s*value:\s*(\d+)\s*\}", text, re.M))
    return {k: int(v) for k, v in fields.items()}


def test_tf_serving_serves_the_models_scoring_calls(render: Render) -> None:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    tf_pod, tf = the_pod(render, "model-server")
    args = dict(a.removeprefix("--").split("=", 1) for a in tf["args"])
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(configmap_file(render, tf_pod, tf, args["model_config_file"]), config)
    served = {m.name: m for m in config.model_config_list.config}
    _, scoring = the_pod(render, "scoring")
    env = effective_env(render, scoring)
    settings = code_settings()
    wanted = {
        env.get("PROLIF_TUMOR_MODEL") or settings["PROLIF_TUMOR_MODEL"][0],
        env.get("PROLIF_MITOSIS_MODEL") or settings["PROLIF_MITOSIS_MODEL"][0],
    }
    assert wanted == {settings["PROLIF_TUMOR_MODEL"][0], settings["PROLIF_MITOSIS_MODEL"][0]}
    assert set(served) == wanted
    # ... and they are the names training exports versions under (models/<name>/<version>/)
    from prolifscore.core.models.contract import DEFAULT_NAMES

    assert set(served) == set(DEFAULT_NAMES.values())
    models_mount = next(m for m in tf["volumeMounts"] if m["name"] == "models")
    assert models_mount.get("readOnly") is True
    for name, model in served.items():
        assert model.base_path == f"{models_mount['mountPath']}/{name}"
        assert model.model_platform == "tensorflow"
    # batching: one Predict of PROLIF_PREDICT_BATCH tiles must fit in a batch
    if args.get("enable_batching") == "true":
        batching = _text_proto_fields(
            configmap_file(render, tf_pod, tf, args["batching_parameters_file"])
        )
        assert set(batching) <= {
            "max_batch_size",
            "batch_timeout_micros",
            "max_enqueued_batches",
            "num_batch_threads",
        }
        predict_batch = int(env.get("PROLIF_PREDICT_BATCH") or settings["PROLIF_PREDICT_BATCH"][0])
        assert batching["max_batch_size"] >= predict_batch
    configmap_file(render, tf_pod, tf, args["monitoring_config_file"])
    # probes: GetModelStatus of exactly these models, via the shipped script
    for probe in ("startupProbe", "readinessProbe"):
        command = tf[probe]["exec"]["command"]
        assert command[:2] == ["/bin/bash", "/etc/tfserving/probe.sh"]
        assert set(command[3:]) == wanted
        script = configmap_file(render, tf_pod, tf, command[1])
        assert script == (K8S_DIR / "base" / "config" / "tfserving-probe.sh").read_text()
    assert tf["livenessProbe"]["tcpSocket"]["port"] == 8500


class _FakeTFServingREST:
    """TF Serving's REST API, the two calls probe.sh makes: GET /v1/models/<name> (the REST form
    of GetModelStatus) and POST /v1/models/<name>:predict. Records the predict bodies."""

    def __init__(self, states: dict[str, str]) -> None:
        import http.server
        import json
        import threading

        self.states = states
        self.predicts: list[tuple[str, Obj]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, code: int, body: Obj) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                name = self.path.removeprefix("/v1/models/")
                if name not in fake.states:
                    self._reply(404, {"error": f"Servable not found for request: {name}"})
                    return
                version = {"version": "1", "state": fake.states[name]}
                self._reply(200, {"model_version_status": [version | {"status": {}}]})

            def do_POST(self) -> None:
                name = self.path.removeprefix("/v1/models/").removesuffix(":predict")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.predicts.append((name, body))
                self._reply(200, {"outputs": [[0.5]]})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeTFServingREST:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_probe(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = K8S_DIR / "base" / "config" / "tfserving-probe.sh"
    return subprocess.run(
        [bash, str(script), *args],
        env={"PATH": "/usr/bin:/bin", "REST_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tf_serving_probe_script_checks_model_status_and_warms_up() -> None:
    """probe.sh (readiness = GetModelStatus of every model, startup = that plus one warm-up
    Predict per model) run for real against a fake TF Serving REST API."""
    from prolifscore.core.models.contract import DEFAULT_NAMES, INPUT

    names = sorted(DEFAULT_NAMES.values())
    with _FakeTFServingREST(dict.fromkeys(names, "AVAILABLE")) as fake:
        ready = _run_probe(fake.port, "ready", *names)
        assert ready.returncode == 0, ready.stderr
        assert fake.predicts == [], "readiness must not send Predicts"
        warm = _run_probe(fake.port, "warmup", *names)
        assert warm.returncode == 0, warm.stderr
        assert [name for name, _ in fake.predicts] == names
        for _, body in fake.predicts:
            # the serving signature's input (what exports declare and scoring sends)
            assert set(body["inputs"]) == {INPUT}
            batch = body["inputs"][INPUT]
            assert len(batch) == 1 and len(batch[0][0][0]) == 3, "one RGB tile, NHWC"
        fake.states[names[0]] = "LOADING"
        loading = _run_probe(fake.port, "ready", *names)
        assert loading.returncode != 0 and f"model {names[0]} is not AVAILABLE" in loading.stderr
        missing = _run_probe(fake.port, "ready", names[1], "no-such-model")
        assert missing.returncode != 0
        port = fake.port
    down = _run_probe(port, "ready", *names)
    assert down.returncode != 0, "no server: not ready"


def test_volumes_match_the_roots_in_settings(render: Render) -> None:
    claims = {pvc["metadata"]["name"] for pvc in render.of_kind("PersistentVolumeClaim")}
    existing = {
        s.get("existingClaim") for s in (dig(render.helm_values or {}, "storage") or {}).values()
    }
    for pod in pod_specs(render):
        for v in pod.spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert claim in claims or claim in existing, f"{pod.where}: no PVC {claim}"
    for component, writable in (
        ("tiling", ()),
        ("filtering", ("PROLIF_TILES_ROOT",)),
        ("scoring", ("PROLIF_RESULTS_ROOT",)),
    ):
        pod, c = the_pod(render, component)
        env = effective_env(render, c)
        for root in (env["PROLIF_SLIDE_ROOTS"] or "").split(","):
            mount = mount_for(c, root)
            assert mount is not None and mount.get("readOnly") is True, (
                f"{component}: slides {root}"
            )
            volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
            assert volume["persistentVolumeClaim"].get("readOnly") is True
        for var in writable:
            mount = mount_for(c, env[var] or "")
            assert mount is not None and not mount.get("readOnly"), f"{component}: {var}"
    # Scoring reads the served models' export metadata where TF Serving serves them from,
    # and may not write there.
    pod, c = the_pod(render, "scoring")
    root = effective_env(render, c)["PROLIF_MODEL_METADATA_ROOT"] or ""
    mount = mount_for(c, root)
    assert mount is not None and mount.get("readOnly") is True, "scoring: model metadata root"
    volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"].get("readOnly") is True
    assert volume["persistentVolumeClaim"]["claimName"].endswith("models")
    # Ray workers run the tiling tasks and filter actors: same paths as the services
    _, filtering = the_pod(render, "filtering")
    fenv = effective_env(render, filtering)
    for pod in pod_specs(render):
        if pod.labels.get("app.kubernetes.io/component") == "ray-worker":
            c = pod.spec["containers"][0]
            assert mount_for(c, fenv["PROLIF_SLIDE_ROOTS"] or "")["readOnly"] is True
            assert not mount_for(c, fenv["PROLIF_TILES_ROOT"] or "").get("readOnly")
        if pod.extra.get("ray"):
            shm = mount_for(pod.spec["containers"][0], "/dev/shm")
            volume = next(v for v in pod.spec["volumes"] if v["name"] == shm["name"])
            assert volume["emptyDir"]["medium"] == "Memory", pod.where


def test_training_job_and_rayjob(render: Render) -> None:
    dataset = ["--dataset", "/data/tiles"]
    for job in render.of_kind("Job"):
        pod = next(p for p in pod_specs(render) if p.where == f"Job/{job['metadata']['name']}")
        c = pod.spec["containers"][0]
        assert c["command"] == ["prolifscore", "train", "resnet50", *dataset]
        assert job["spec"]["suspend"] is True, "training starts only when asked"
        env = effective_env(render, c)
        assert env["PROLIF_RAY_ADDRESS"] == "", "the Job trains with a Ray inside its pod"
        assert int(env["PROLIF_RAY_NUM_CPUS"] or 0) <= quantity(c["resources"]["limits"]["cpu"])
        assert env["PROLIF_TRAIN_WORKERS"] == "1"
        _check_training_mounts(pod, c, env)
    for rj in render.of_kind("RayJob"):
        assert rj["spec"]["entrypoint"] == " ".join(["prolifscore", "train", "resnet50", *dataset])
        assert rj["spec"]["suspend"] is True and rj["spec"]["shutdownAfterJobFinishes"] is True
        cluster = rj["spec"]["rayClusterSpec"]
        head_pod = next(
            p for p in pod_specs(render) if p.where.startswith("RayJob/") and p.extra["head"]
        )
        head = head_pod.spec["containers"][0]
        env = effective_env(render, head)
        workers = sum(g["replicas"] for g in cluster["workerGroupSpecs"])
        assert int(env["PROLIF_TRAIN_WORKERS"] or 0) == workers, "one Ray Train worker per pod"
        for pod in pod_specs(render):
            if pod.where.startswith(f"RayJob/{rj['metadata']['name']}/"):
                _check_training_mounts(pod, pod.spec["containers"][0], env)


def _parse_train_command(argv: list[str]) -> Any:
    """Parse a `prolifscore train ...` command line with the CLI's real argument parser."""
    import argparse

    from prolifscore.cli import train

    assert argv[0] == "prolifscore", argv
    parser = argparse.ArgumentParser(prog="prolifscore", exit_on_error=False)
    train.add_parsers(parser.add_subparsers(dest="command", required=True))
    try:
        return parser.parse_args(argv[1:])
    except (argparse.ArgumentError, SystemExit) as e:
        raise AssertionError(f"not a valid prolifscore command: {argv}: {e}") from e


def test_training_commands_are_valid_cli_calls(render: Render) -> None:
    """The Job's command and the RayJob's entrypoint parse with `prolifscore train`'s parser,
    train a model TF Serving serves, and read the dataset from the tiles volume."""
    tf_pod, tf = the_pod(render, "model-server")
    args = dict(a.removeprefix("--").split("=", 1) for a in tf["args"])
    served = set(
        re.findall(
            r'name:\s*"([^"]+)"', configmap_file(render, tf_pod, tf, args["model_config_file"])
        )
    )
    commands: list[tuple[str, list[str], Obj]] = []
    for job in render.of_kind("Job"):
        pod = next(p for p in pod_specs(render) if p.where == f"Job/{job['metadata']['name']}")
        c = pod.spec["containers"][0]
        commands.append((pod.where, c["command"], c))
    for rj in render.of_kind("RayJob"):
        head = next(
            p
            for p in pod_specs(render)
            if p.where.startswith(f"RayJob/{rj['metadata']['name']}/") and p.extra["head"]
        )
        commands.append(
            (
                f"RayJob/{rj['metadata']['name']}",
                rj["spec"]["entrypoint"].split(),
                head.spec["containers"][0],
            )
        )
    assert commands or (
        dig(render.helm_values or {}, "training.job.enabled") is False
        and dig(render.helm_values or {}, "ray.enabled") is False
    )
    for where, argv, container in commands:
        parsed = _parse_train_command(argv)
        assert parsed.command == "train", where
        assert parsed.model in served, f"{where}: trains {parsed.model}, TF Serving serves {served}"
        mount = mount_for(container, parsed.dataset)
        assert mount is not None and mount["name"] == "tiles", f"{where}: dataset {parsed.dataset}"
    with pytest.raises(AssertionError):
        _parse_train_command(["prolifscore", "train", "resnet50"])  # --dataset is required


def _check_training_mounts(pod: PodSpec, c: Obj, env: dict[str, str | None]) -> None:
    tiles = mount_for(c, "/data/tiles")
    assert tiles is not None and tiles.get("readOnly") is True, pod.where
    for var in ("PROLIF_MODEL_ROOT", "PROLIF_RUNS_ROOT"):
        mount = mount_for(c, env[var] or "")
        assert mount is not None and not mount.get("readOnly"), f"{pod.where}: {var}"
        assert "persistentVolumeClaim" in volume_of(pod, mount), f"{pod.where}: {var} must persist"
    assert mount_for(c, "/dev/shm") is not None, pod.where


# ---------------------------------------------------------------------------------------------
# Dockerfile, README


def _dockerfile_stages() -> list[tuple[str, list[str]]]:
    text = (ROOT / "Dockerfile").read_text()
    lines: list[str] = []
    for raw in text.replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))
    stages: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[1])
            stages.append((base, [line]))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile() -> None:
    stages = _dockerfile_stages()
    names = {s[1][0].split()[-1]: s for s in stages if " AS " in s[1][0].upper()}
    assert len(stages) >= 3, "multi-stage"
    for base, _ in stages:
        if base in names:
            continue
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    runtime_base = names["runtime-base"][1]
    user = next(line.split()[1] for line in reversed(runtime_base) if line.startswith("USER "))
    uid = int(user.split(":")[0])
    assert uid != 0
    assert f"runAsUser: {uid}" in (K8S_DIR / "base" / "tiling.yaml").read_text()
    assert str(uid) in (CHART_DIR / "values.yaml").read_text()
    for final in ("runtime", "gpu"):
        base, lines = names[final]
        assert base == "runtime-base"
        assert not any(line.startswith(("RUN ", "USER ")) for line in lines[1:]), final
        assert all(
            line.startswith("COPY --from=builder") for line in lines[1:] if line.startswith("COPY")
        )
    assert stages[-1][1][0].split()[-1] == "runtime", "the default target is the CPU image"
    installs = " ".join(line for _, lines in stages for line in lines if "pip install" in line)
    assert "-r requirements/lock.txt" not in installs and "dev.in" not in installs, (
        "runtime deps only"
    )
    assert "-c requirements/lock.txt -r requirements/base.in" in installs
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests", "services/prolifscore/v1", "build"} <= set(ignored)
    assert not {"services", "protos", "requirements", "pyproject.toml", "README.md"} & set(ignored)


def test_readme_kubernetes_section() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Kubernetes")
    assert start < text.index("\n## Benchmarks")
    section = text[start : text.index("\n## ", start + 1)]
    for needle in (
        "helm install",
        "kubectl apply -k",
        "Strimzi",
        "KubeRay",
        "KEDA",
        "GPU",
        "make k8s-validate",
    ):
        assert needle in section, needle
