"""Operator resources, checked offline three ways:

- the operators' published schemas where a package from a reachable registry carries them: npm's
  @kubernetes-models/keda, /cert-manager and /prometheus-operator (generated from KEDA's,
  cert-manager's and the Prometheus Operator's own API types; tests/deploy/package.json, installed
  by `make setup`), run through node (crd_schemas.mjs) for ScaledObject, TriggerAuthentication,
  Certificate, Issuer, ServiceMonitor, PodMonitor and PrometheusRule;
- Ray's own autoscaler code (the pinned `ray` package) deriving its autoscaling config from the
  RayClusters, as the autoscaler sidecar does at run time;
- our own minimal checks (API version, known and required fields, enums from the operators' CRDs)
  for Strimzi (Kafka, KafkaNodePool, KafkaTopic, KafkaUser) and KubeRay (RayCluster, RayJob), whose
  schemas no PyPI or npm package carries, with the Kubernetes types embedded in them (pod
  templates, HPA behavior, security contexts, resources, peers) validated against the core schemas.
Core objects are validated strictly against the pinned Kubernetes version.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path

from tests.deploy.manifests import (
    HELM_NAMESPACE,
    RENDER_NAMES,
    Obj,
    Render,
    dig,
    quantity,
    words,
)

HERE = Path(__file__).resolve().parent

# Kinds of the operators' CRDs and their API versions.
CRD_API = {
    "Kafka": "kafka.strimzi.io/v1",
    "KafkaNodePool": "kafka.strimzi.io/v1",
    "KafkaTopic": "kafka.strimzi.io/v1",
    "KafkaUser": "kafka.strimzi.io/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "Certificate": "cert-manager.io/v1",
    "Issuer": "cert-manager.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}
# Checked against the published schemas (crd_schemas.mjs); the others get our minimal checks.
PUBLISHED_SCHEMA = {
    "ScaledObject": "@kubernetes-models/keda",
    "TriggerAuthentication": "@kubernetes-models/keda",
    "Certificate": "@kubernetes-models/cert-manager",
    "Issuer": "@kubernetes-models/cert-manager",
    "ServiceMonitor": "@kubernetes-models/prometheus-operator",
    "PodMonitor": "@kubernetes-models/prometheus-operator",
    "PrometheusRule": "@kubernetes-models/prometheus-operator",
}
Validate = Callable[[Obj], str]

# ---------------------------------------------------------------------------------------------
# Schema validation


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


def check_keys(
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
AUTOSCALER_OPTIONS = words(
    "env envFrom idleTimeoutSeconds image imagePullPolicy resources securityContext "
    "upscalingMode version volumeMounts"
)
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
KAFKA_USER_SPEC = {"authentication", "authorization", "quotas", "template"}
ACL_OPERATIONS = words(
    "All Alter AlterConfigs ClusterAction Create Delete Describe DescribeConfigs IdempotentWrite "
    "Read Write"
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
    errors = check_keys(where, spec, RAY_CLUSTER_SPEC, {"headGroupSpec"})
    auth = spec.get("authOptions")
    if auth is not None:
        errors += check_keys(
            f"{where}.authOptions", auth, {"mode", "secretName", "enableK8sTokenAuth"}
        )
        if auth.get("mode") not in ("disabled", "token"):
            errors.append(f"{where}.authOptions.mode: {auth.get('mode')!r}")
    head = spec["headGroupSpec"]
    errors += check_keys(
        f"{where}.headGroupSpec", head, RAY_HEAD_GROUP, {"template", "rayStartParams"}
    )
    if dig(spec, "upgradeStrategy.type") not in (None, "Recreate", "None"):
        errors.append(f"{where}.upgradeStrategy.type")
    options = spec.get("autoscalerOptions")
    if options is not None:
        w = f"{where}.autoscalerOptions"
        errors += check_keys(w, options, AUTOSCALER_OPTIONS)
        if options.get("upscalingMode", "Default") not in ("Default", "Aggressive", "Conservative"):
            errors.append(f"{w}.upscalingMode")
        if not isinstance(options.get("idleTimeoutSeconds", 0), int):
            errors.append(f"{w}.idleTimeoutSeconds")
        # the sidecar's container fields are core types: validate them inside the head pod
        sidecar = {"name": "autoscaler", "image": "x"}
        sidecar |= {
            k: options[k]
            for k in ("securityContext", "resources", "volumeMounts", "env")
            if k in options
        }
        head_spec = head["template"]["spec"]
        validate(_pod_template({**head_spec, "containers": [*head_spec["containers"], sidecar]}))
        volumes = {v["name"] for v in head_spec.get("volumes", [])}
        for m in options.get("volumeMounts", []):
            if m["name"] not in volumes:
                errors.append(f"{w}.volumeMounts: {m['name']} is no volume of the head pod")
    groups = [("headGroupSpec", head)]
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        errors += check_keys(w, g, RAY_WORKER_GROUP, {"groupName", "template", "rayStartParams"})
        low, high = g.get("minReplicas", 0), g.get("maxReplicas", 2**31)
        if not low <= g.get("replicas", low) <= high:
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


def _strimzi_container(
    validate: Validate, template: Obj | None, container: str, resources: Obj | None
) -> None:
    """A Strimzi component's pod template (its pod and container security contexts) and
    resources: core types, validated as a pod."""
    pod = dig(template or {}, "pod.securityContext")
    validate(
        _one_container_pod(pod, "c", dig(template or {}, f"{container}.securityContext"), resources)
    )


def _netpol_with_peer(peer: Obj) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "embedded"},
        "spec": {"podSelector": {}, "ingress": [{"from": [peer]}]},
    }


LISTENER_TYPES = ("internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def _kafka_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = check_keys(where, spec, KAFKA_SPEC, {"kafka"})
    errors += check_keys(f"{where}.kafka", spec["kafka"], KAFKA_KAFKA, {"listeners"})
    for i, lst in enumerate(spec["kafka"]["listeners"]):
        w = f"{where}.kafka.listeners[{i}]"
        errors += check_keys(w, lst, KAFKA_LISTENER, {"name", "port", "type", "tls"})
        if not re.fullmatch(r"[a-z0-9]{1,11}", lst["name"]):
            errors.append(f"{w}.name")
        if lst["port"] < 9092 or lst["port"] in (9404, 9999):
            errors.append(f"{w}.port {lst['port']} is reserved")
        if lst["type"] not in LISTENER_TYPES:
            errors.append(f"{w}.type")
        for peer in lst.get("networkPolicyPeers", []):
            validate(_netpol_with_peer(peer))
        auth = lst.get("authentication")
        if auth is not None and auth.get("type") not in ("tls", "scram-sha-512", "oauth", "custom"):
            errors.append(f"{w}.authentication.type")
    authz = spec["kafka"].get("authorization")
    if authz is not None:
        errors += check_keys(
            f"{where}.kafka.authorization", authz, {"type", "superUsers"}, {"type"}
        )
        if authz["type"] not in ("simple", "opa", "keycloak", "custom"):
            errors.append(f"{where}.kafka.authorization.type")
    eo = spec.get("entityOperator", {})
    errors += check_keys(
        f"{where}.entityOperator", eo, {"topicOperator", "userOperator", "template"}
    )
    for operator in ("topicOperator", "userOperator"):
        if operator in eo:
            resources = dig(eo, f"{operator}.resources")
            _strimzi_container(validate, eo.get("template"), f"{operator}Container", resources)
    exporter = spec.get("kafkaExporter")
    if exporter is not None:
        keys = {
            "groupRegex",
            "topicRegex",
            "groupExcludeRegex",
            "topicExcludeRegex",
            "resources",
            "template",
            "logging",
            "enableSaramaLogging",
            "showAllOffsets",
            "image",
            "livenessProbe",
            "readinessProbe",
        }
        errors += check_keys(f"{where}.kafkaExporter", exporter, keys)
        for regex in ("groupRegex", "topicRegex"):
            re.compile(exporter.get(regex, ".*"))
        _strimzi_container(
            validate, exporter.get("template"), "container", exporter.get("resources")
        )
    return errors


def _node_pool_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = check_keys(where, spec, NODE_POOL_SPEC, {"replicas", "roles", "storage"})
    if not spec["roles"] or not set(spec["roles"]) <= {"controller", "broker"}:
        errors.append(f"{where}.roles")
    storage = spec["storage"]
    if storage["type"] not in ("jbod", "ephemeral", "persistent-claim"):
        errors.append(f"{where}.storage.type")
    for v in storage.get("volumes", []):
        if v.get("type") not in ("ephemeral", "persistent-claim") or "id" not in v:
            errors.append(f"{where}.storage.volumes: {v}")
    _strimzi_container(validate, spec.get("template"), "kafkaContainer", spec.get("resources"))
    return errors


def _topic_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = check_keys(where, spec, {"topicName", "partitions", "replicas", "config"})
    if not (isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1):
        errors.append(f"{where}.partitions")
    replicas = spec.get("replicas", 1)  # optional: the broker default
    if not (isinstance(replicas, int) and 1 <= replicas <= 32767):
        errors.append(f"{where}.replicas")
    return errors


def _user_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = check_keys(where, spec, KAFKA_USER_SPEC)
    if dig(spec, "authentication.type") not in ("tls", "tls-external", "scram-sha-512"):
        errors.append(f"{where}.authentication.type")
    authz = spec.get("authorization")
    if authz is not None:
        errors += check_keys(f"{where}.authorization", authz, {"type", "acls"}, {"type", "acls"})
        for i, acl in enumerate(authz["acls"]):
            w = f"{where}.authorization.acls[{i}]"
            errors += check_keys(
                w, acl, {"resource", "operations", "host", "type"}, {"resource", "operations"}
            )
            res = acl["resource"]
            errors += check_keys(f"{w}.resource", res, {"type", "name", "patternType"}, {"type"})
            if res["type"] not in ("topic", "group", "cluster", "transactionalId"):
                errors.append(f"{w}.resource.type")
            if res.get("patternType", "literal") not in ("literal", "prefix"):
                errors.append(f"{w}.resource.patternType")
            if not acl["operations"] or not set(acl["operations"]) <= ACL_OPERATIONS:
                errors.append(f"{w}.operations {acl['operations']}")
    return errors


def _ray_job_errors(where: str, spec: Obj, validate: Validate) -> list[str]:
    errors = check_keys(where, spec, RAY_JOB_SPEC)
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
    errors = check_keys(where, spec, KEDA_SPEC, {"scaleTargetRef", "triggers"})
    target_keys = {"apiVersion", "kind", "name", "envSourceContainerName"}
    errors += check_keys(f"{where}.scaleTargetRef", spec["scaleTargetRef"], target_keys, {"name"})
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
        errors += check_keys(w, trig, trigger_keys, {"type", "metadata"})
        if not all(isinstance(v, str) for v in trig["metadata"].values()):
            errors.append(f"{w}.metadata: values must be strings")
        if trig["type"] == "kafka":
            md = trig["metadata"]
            required = {"bootstrapServers", "consumerGroup", "topic"}
            errors += check_keys(f"{w}.metadata", md, KEDA_KAFKA_METADATA, required)
            if md.get("offsetResetPolicy", "latest") not in ("earliest", "latest"):
                errors.append(f"{w}.offsetResetPolicy")
            sasl = ("none", "plaintext", "scram_sha256", "scram_sha512", "oauthbearer", "gssapi")
            if md.get("sasl", "none") not in sasl:
                errors.append(f"{w}.sasl")
            if md.get("tls", "disable") not in ("enable", "disable"):
                errors.append(f"{w}.tls")
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


def _published_schema_only(where: str, spec: Obj, validate: Validate) -> list[str]:
    """Kinds whose whole schema test_published_crd_schemas checks (only the common checks here)."""
    return []


CRD_CHECKS: dict[str, Callable[[str, Obj, Validate], list[str]]] = {
    "Kafka": _kafka_errors,
    "KafkaNodePool": _node_pool_errors,
    "KafkaTopic": _topic_errors,
    "KafkaUser": _user_errors,
    "TriggerAuthentication": _published_schema_only,
    "Certificate": _published_schema_only,
    "Issuer": _published_schema_only,
    "ServiceMonitor": _published_schema_only,
    "PodMonitor": _published_schema_only,
    "PrometheusRule": _published_schema_only,
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
    errors += check_keys(where, o, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"})
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
        errors.append(f"{where}: invalid name")
    if kind in ("KafkaNodePool", "KafkaTopic", "KafkaUser") and "strimzi.io/cluster" not in o[
        "metadata"
    ].get("labels", {}):
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
    bad_user = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaUser",
        "metadata": {"name": "u", "labels": {"strimzi.io/cluster": "k"}},
        "spec": {
            "authentication": {"type": "scram-sha-256"},
            "authorization": {
                "type": "simple",
                "acls": [{"resource": {"type": "topic", "name": "t"}, "operations": ["Consume"]}],
            },
        },
    }
    errors = crd_errors(bad_user, k8s_validate)
    assert len(errors) == 2 and "authentication" in errors[0] and "Consume" in errors[1]


# ---------------------------------------------------------------------------------------------
# The operators' published schemas (npm @kubernetes-models, through node)


def published_schema_errors(objects: list[Obj]) -> list[tuple[str | None, list[str]]]:
    """(package that checked it or None, errors) per object, from crd_schemas.mjs."""
    node = shutil.which("node")
    assert node, "node is required for tests/deploy (the operators' CRD schemas): install nodejs"
    models = HERE / "node_modules" / "@kubernetes-models"
    assert all((models / p.split("/")[1]).is_dir() for p in set(PUBLISHED_SCHEMA.values())), (
        "the CRD schema packages are missing: run `make setup` (make k8s-tools)"
    )
    out = subprocess.run(
        [node, str(HERE / "crd_schemas.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=HERE,
    ).stdout
    return [(r["schema"], r["errors"]) for r in json.loads(out)]


def test_published_crd_schemas(renders: dict[str, Render]) -> None:
    """Every KEDA, cert-manager and Prometheus Operator object of every render validates against
    its operator's published schema (one node process for all of them)."""
    objects = [(name, o) for name in RENDER_NAMES for o in renders[name].objects]
    results = published_schema_errors([o for _, o in objects])
    checked = set()
    errors = []
    for (name, o), (schema, errs) in zip(objects, results, strict=True):
        assert schema == PUBLISHED_SCHEMA.get(o["kind"]), (o["kind"], schema)
        if schema:
            checked.add(o["kind"])
            errors += [f"{name}: {o['kind']}/{o['metadata']['name']}: {e}" for e in errs]
    assert not errors, "\n".join(errors)
    assert checked == set(PUBLISHED_SCHEMA), "some kinds were never rendered"


def test_published_crd_schemas_catch_mistakes() -> None:
    base = {"metadata": {"name": "x"}}
    bad = [
        {
            **base,
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "spec": {
                "scaleTargetRef": {"name": "d"},
                "minReplicaCount": "one",
                "triggers": [{"type": "kafka", "metadata": {}}],
            },
        },
        {
            **base,
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "spec": {"secretName": "s", "issuerRef": {"name": "i"}, "usages": ["server"]},
        },
        {
            **base,
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "often"}]},
        },
        {
            **base,
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "spec": {"groups": [{"rules": [{"alert": "A", "expr": "up"}]}]},
        },  # group needs a name
    ]
    results = published_schema_errors(bad)
    assert [bool(errs) for _, errs in results] == [True] * len(bad), results


# ---------------------------------------------------------------------------------------------
# Ray's own autoscaler reading our RayClusters


def ray_autoscaling_config(cluster: Obj) -> Obj:
    """The autoscaling config Ray's autoscaler sidecar derives from this RayCluster (the pinned
    `ray` package's own code, config validation included)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {**cluster, "metadata": {"namespace": HELM_NAMESPACE, **cluster["metadata"]}}
    return _derive_autoscaling_config_from_ray_cr(cr)


def test_ray_autoscaler_reads_the_rayclusters(render: Render) -> None:
    """The autoscaler understands every autoscaling RayCluster: its worker groups become node
    types with the CPUs, memory and bounds we set, and the head takes no work."""
    for cluster in render.of_kind("RayCluster"):
        if not cluster["spec"].get("enableInTreeAutoscaling"):
            continue
        config = ray_autoscaling_config(cluster)
        types = config["available_node_types"]
        head = types.pop(config["head_node_type"])
        assert head["resources"].get("CPU", 0) == 0, "the head takes no tasks (num-cpus 0)"
        options = cluster["spec"]["autoscalerOptions"]
        assert config["idle_timeout_minutes"] == options["idleTimeoutSeconds"] / 60
        for group in cluster["spec"]["workerGroupSpecs"]:
            node = types[group["groupName"]]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert node["resources"]["CPU"] == quantity(limits["cpu"])
            assert (
                node["min_workers"]
                == group["minReplicas"]
                < node["max_workers"]
                == group["maxReplicas"]
            )
            assert "replicas" not in group, "the autoscaler owns the worker count"
