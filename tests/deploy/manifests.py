"""Rendering of the Kubernetes deployment (k8s/ kustomize base and overlays, the helm/prolifscore
chart) and the helpers the checks in tests/deploy share: pod templates of every workload (operator
resources included), effective environments, selectors, quantities, and the services' settings as
the code declares them (prolifscore.cli.main.config_rows)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


_EXTERNAL_USERS = {
    s: {"username": f"ps-{s}", "passwordSecret": f"kafka-{s}", "passwordKey": "password"}
    for s in ("tiling", "filtering", "scoring", "training", "keda")
}

# Values of the non-default chart renders: every switch the chart has, flipped.
HELM_CASES: dict[str, Obj | None] = {
    "defaults": None,
    "external-sasl-kafka-local-ray-no-keda-gpu": {
        "kafka": {
            "mode": "external",
            "externalBootstrap": "kafka-0.kafka.example:9094,kafka-1.kafka.example:9094",
            "externalPeers": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
            "externalPorts": [9094],
            "external": {
                "securityProtocol": "SASL_SSL",
                "caSecret": "corp-kafka-ca",
                "saslMechanism": "SCRAM-SHA-256",
                "users": _EXTERNAL_USERS,
            },
        },
        "ray": {"enabled": False},
        "keda": {"enabled": False},
        "tracing": {
            "enabled": True,
            "otlpEndpoint": "http://collector.telemetry:4318",
            "protocol": "http/protobuf",
            "samplingRatio": 0.25,
            "collectorPort": 4318,
        },
        "modelServer": {"gpu": {"enabled": True}, "replicas": 2},
        "training": {"job": {"gpu": True}, "rayJob": {"gpu": True}},
        "scoring": {"authSecret": "prolifscore-scoring-token", "replicas": 3},
        "image": {"digest": "sha256:" + "0123456789abcdef" * 4},
        "spread": False,
    },
    "external-mtls-kafka-keda-fixed-ray-own-certs": {
        "kafka": {
            "mode": "external",
            "externalBootstrap": "kafka.example:9093",
            "externalPeers": [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
            "externalPorts": [9093],
            "external": {
                "securityProtocol": "SSL",
                "caSecret": "corp-kafka-ca",
                "clientCertSecret": "prolifscore-kafka-client",
            },
        },
        "ray": {"autoscaling": {"enabled": False}, "workers": {"replicas": 3}},
        "tls": {
            "enabled": True,
            "certManager": {"enabled": False},
            "secrets": {
                s: f"own-{s.lower()}-tls"
                for s in ("tiling", "filtering", "scoring", "training", "modelServer")
            },
        },
        "training": {"service": {"enabled": False}, "models": ["mitosis"]},
        "viewer": {"enabled": False},
    },
    "bundled-prod-tls-monitoring-existing-claims": {
        "fullnameOverride": "pscore",
        "kafka": {
            "storage": {"type": "ephemeral", "size": "20Gi"},
            "replicas": 1,
            "replicationFactor": 1,
            "minInsyncReplicas": 1,
        },
        "ray": {"existingAuthSecret": "my-ray-token", "workers": {"maxReplicas": 30}},
        "storage": {"slides": {"existingClaim": "hospital-slides"}},
        "networkPolicy": {"enabled": False},
        "tls": {
            "enabled": True,
            "certManager": {"issuerRef": {"kind": "ClusterIssuer", "name": "corp"}},
        },
        "monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "training": {"job": {"enabled": False}, "rayJob": {"gpu": True, "workers": 4}},
        "config": {"extraEnv": {"PROLIF_KAFKA_DELIVERY_TIMEOUT_MS": 3000000}},
        "tiling": {"extraEnv": {"PROLIF_TISSUE_MODE": "seed", "PROLIF_TILING_TASK_CPUS": 0.5}},
    },
}

# The kustomize renders and the components each one chooses (k8s/overlays/*/kustomization.yaml).
KUSTOMIZE_CASES: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "dev": frozenset({"keda", "network-policies"}),
    "prod": frozenset(
        {"keda", "network-policies", "gpu", "cert-manager", "grpc-tls", "monitoring"}
    ),
    # tests/deploy/overlays: dev plus the tracing component (no shipped overlay turns it on)
    "dev-tracing": frozenset({"keda", "network-policies", "tracing"}),
}
TEST_OVERLAYS = Path(__file__).parent / "overlays"
ALWAYS = frozenset(
    {"ray", "ray-autoscaling", "bundled-kafka", "training-service", "job", "rayjob", "viewer"}
)

# Environment variables our containers may carry besides the PROLIF_* settings: Ray reads these
# (prolifscore.core.runtime.ray defaults RAY_AUTH_MODE=token; the token comes from the Secret);
# JOB_UID names a training Job's run folder (`--run-id <model>-$(JOB_UID)`).
# The OpenTelemetry SDK reads the OTEL_* variables (core/runtime/tracing_export.py).
THIRD_PARTY_ENV = {
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "JOB_UID",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}
OUR_IMAGES = ("/prolifscore:", "/prolifscore@", "/prolifscore-gpu:", "/prolifscore-gpu@")
SERVICE_COMMANDS = {
    "prolifscore-tiling": "tiling",
    "prolifscore-filtering": "filtering",
    "prolifscore-scoring": "scoring",
    "prolifscore-modelserver": "modelserver",
    "prolifscore-training": "training",
    "prolifscore-viewer": "viewer",
}
# The gRPC services (Deployments) and what each Kafka consumer consumes:
# (topic variable, consumer-group variable).
GRPC_SERVICES = ("tiling", "filtering", "scoring", "training")
CONSUMES = {
    "tiling": ("PROLIF_TOPIC_INGEST", "PROLIF_TILING_GROUP"),
    "filtering": ("PROLIF_TOPIC_TASKS", "PROLIF_FILTERING_GROUP"),
    "scoring": ("PROLIF_TOPIC_SCORE_REQUESTS", "PROLIF_SCORING_GROUP"),
    "training": ("PROLIF_TOPIC_TRAIN_REQUESTS", "PROLIF_TRAINING_GROUP"),
}
RESTRICTED_VOLUME_TYPES = words(
    "configMap csi downwardAPI emptyDir ephemeral persistentVolumeClaim projected secret"
)
AUTOSCALER = "autoscaler"  # the name we give the container KubeRay injects into an autoscaling head


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Render:
    name: str
    objects: list[Obj]
    features: frozenset[str]
    helm_values: Obj | None = None
    is_helm: bool = False
    notes: str = ""

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def value(self, path: str, default: Any = None) -> Any:
        """A Helm value of this render (the chart's default when not set); kustomize: `default`."""
        if not self.is_helm:
            return default
        return _merged(dig(chart_defaults(), path), dig(self.helm_values or {}, path))


def kubectl() -> str:
    """kubectl (its built-in kustomize): required, so a missing one fails with this message."""
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )
    if found is None:
        raise AssertionError("kubectl (kustomize) is required for tests/deploy: install kubectl")
    return found


def _load_all(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def _kustomize_path(name: str) -> Path:
    if name == "base":
        return K8S_DIR / "base"
    shipped = K8S_DIR / "overlays" / name
    return shipped if shipped.exists() else TEST_OVERLAYS / name


def _kustomize_render(name: str, out: str) -> Render:
    return Render(f"kustomize/{name}", _load_all(out), ALWAYS | KUSTOMIZE_CASES[name])


def render_kustomize(name: str) -> Render:
    out = subprocess.run(
        [kubectl(), "kustomize", str(_kustomize_path(name))],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return _kustomize_render(name, out)


def _merged(default: Any, value: Any) -> Any:
    """Helm's values merge: maps merge key by key, anything else replaces."""
    if isinstance(default, dict) and isinstance(value, dict):
        keys = {*default, *value}
        return {
            k: _merged(default.get(k), value.get(k)) if k in value else default[k] for k in keys
        }
    return default if value is None else value


@functools.cache
def chart_defaults() -> Obj:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def helm_features(values: Obj | None) -> frozenset[str]:
    """The features a chart render has, from its values (over the chart's defaults)."""

    def on(path: str) -> bool:
        found = dig(values or {}, path)
        return bool(dig(chart_defaults(), path) if found is None else found)

    ray = on("ray.enabled")
    flags = {
        "keda": on("keda.enabled"),
        "network-policies": on("networkPolicy.enabled"),
        "gpu": on("modelServer.gpu.enabled"),
        "grpc-tls": on("tls.enabled"),
        "cert-manager": on("tls.enabled") and on("tls.certManager.enabled"),
        "monitoring": on("monitoring.enabled"),
        "ray": ray,
        "ray-autoscaling": ray and on("ray.autoscaling.enabled"),
        "bundled-kafka": (dig(values or {}, "kafka.mode") or "bundled") == "bundled",
        "training-service": on("training.service.enabled"),
        "job": on("training.job.enabled"),
        "rayjob": ray and on("training.rayJob.enabled"),
        "viewer": on("viewer.enabled"),
        "tracing": on("tracing.enabled"),
    }
    return frozenset(k for k, v in flags.items() if v)


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
    return Render(f"helm/{case}", objects, helm_features(values), values, True, notes)


def render_all() -> dict[str, Render]:
    """Every render; the kustomize builds run in the background while Helm renders."""
    builds = {
        name: subprocess.Popen(
            [kubectl(), "kustomize", str(_kustomize_path(name))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in KUSTOMIZE_CASES
    }
    result = {f"helm/{case}": render_helm(case, values) for case, values in HELM_CASES.items()}
    for name, build in builds.items():
        out, err = build.communicate(timeout=120)
        assert build.returncode == 0, f"kubectl kustomize {_kustomize_path(name)}: {err}"
        result[f"kustomize/{name}"] = _kustomize_render(name, out)
    return {n: result[n] for n in RENDER_NAMES}


RENDER_NAMES = [f"kustomize/{n}" for n in KUSTOMIZE_CASES] + [f"helm/{c}" for c in HELM_CASES]


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
                extra: dict[str, Any] = {"ray": True, "head": group == "head", "injected": []}
                if group == "head" and cluster.get("enableInTreeAutoscaling"):
                    extra["injected"].append(autoscaler_container(cluster))
                yield PodSpec(
                    f"{kind}/{name}/{group}",
                    t.get("metadata", {}).get("labels", {}),
                    t["spec"],
                    kind == "RayCluster",
                    extra,
                )


def autoscaler_container(cluster: Obj) -> Obj:
    """The Ray autoscaler sidecar KubeRay adds to an autoscaling head, as far as our spec sets it
    (autoscalerOptions: image default = the head's, security context, resources, mounts)."""
    options = cluster.get("autoscalerOptions") or {}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {
        "name": AUTOSCALER,
        "image": options.get("image", head["image"]),
        "securityContext": options.get("securityContext", {}),
        "resources": options.get("resources", {}),
        "volumeMounts": options.get("volumeMounts", []),
    }


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def pod_containers(pod: PodSpec) -> list[Obj]:
    """Every container the pod will run: init, declared, and those an operator injects."""
    return containers(pod.spec) + list(pod.extra.get("injected", []))


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


def grpc_services(render: Render) -> tuple[str, ...]:
    """The gRPC service Deployments this render has (training only with its service)."""
    return tuple(
        s for s in GRPC_SERVICES if s != "training" or "training-service" in render.features
    )


def grpc_servers(render: Render) -> tuple[str, ...]:
    """Every Deployment of ours serving gRPC: the services and the viewer (health only)."""
    return (*grpc_services(render), *(("viewer",) if "viewer" in render.features else ()))


def port_number(container: Obj, port: int | str) -> int:
    """A probe's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def the_pod(render: Render, component: str) -> tuple[PodSpec, Obj]:
    found = [
        (p, p.spec["containers"][0])
        for p in pod_specs(render)
        if p.labels.get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{render.name}: expected one {component} workload, got {len(found)}"
    return found[0]
