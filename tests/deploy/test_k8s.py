"""Offline checks of the Kubernetes deployment (k8s/ kustomize base, overlays and components,
helm/prolifscore chart, Dockerfile): what every render has, Helm lint and values schema, Pod
Security "restricted", resources, probes, images, labels, selectors, NetworkPolicies, and the
manifests against the code (settings, ports, addresses, topics, models, mounts, training commands).

Everything runs without a cluster, Docker or network. Rendering is in manifests.py; operator
resources (CRD schemas, Ray's autoscaler), Kafka authentication, gRPC mTLS, monitoring and scaling
have their own modules here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from prolifscore.core.runtime.service import LIVENESS
from tests.deploy.manifests import (
    CHART_DIR,
    CONSUMES,
    HELM_CASES,
    HELM_NAMESPACE,
    K8S_DIR,
    K8S_VERSION,
    RELEASE,
    RESTRICTED_VOLUME_TYPES,
    ROOT,
    THIRD_PARTY_ENV,
    Obj,
    PodSpec,
    Render,
    code_settings,
    code_topics,
    configmap_file,
    containers,
    dig,
    effective_env,
    grpc_servers,
    grpc_services,
    is_ours,
    matches,
    mount_for,
    pod_containers,
    pod_specs,
    port_number,
    quantity,
    render_helm,
    service_of,
    the_pod,
    volume_of,
)

# ---------------------------------------------------------------------------------------------
# Render + lint


# Kinds each feature adds (and only it): a render has them exactly when it has the feature.
FEATURE_KINDS = {
    "bundled-kafka": {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"},
    "ray": {"RayCluster"},
    "rayjob": {"RayJob"},
    "job": {"Job"},
    "keda": {"ScaledObject"},
    "network-policies": {"NetworkPolicy"},
    "cert-manager": {"Certificate", "Issuer"},
    "monitoring": {"ServiceMonitor", "PodMonitor", "PrometheusRule"},
}


def test_every_render_has_the_system(render: Render) -> None:
    kinds = {o["kind"] for o in render.objects}
    for component in (*grpc_services(render), "model-server"):
        the_pod(render, component)
    assert {"Service", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"} <= kinds
    for feature, feature_kinds in FEATURE_KINDS.items():
        if feature == "cert-manager" and render.value("tls.certManager.issuerRef"):
            feature_kinds = {"Certificate"}  # the user's issuer signs
        assert (feature_kinds <= kinds) == (feature in render.features), (render.name, feature)
        if feature not in render.features:
            assert not feature_kinds & kinds, (render.name, feature)
    services = {o["metadata"]["name"] for o in render.of_kind("Deployment")}
    assert any(n.endswith("-training") for n in services) == ("training-service" in render.features)
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
        # TLS without cert-manager and without its Secrets would serve nothing it can prove
        {"tls": {"enabled": True, "certManager": {"enabled": False}}},
        {"tls": {"enabled": True, "secretName": "old-style"}},
        {"kafka": {"external": {"securityProtocol": "SASL"}}},
        {"kafka": {"external": {"saslMechanism": "GSSAPI"}}},
        {"training": {"models": ["resnet50", "vgg"]}},
        {"ray": {"autoscaling": {"upscalingMode": "Fast"}}},
        {"monitoring": {"interval": "often"}},
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
    # SASL to an external cluster needs every service's user and password Secret
    external = {
        "mode": "external",
        "externalBootstrap": "k:9092",
        "externalPeers": [{"podSelector": {}}],
        "external": {"securityProtocol": "SASL_SSL"},
    }
    with pytest.raises(helm.HelmError, match=r"kafka\.external\.users\.\w+\.username"):
        render_helm("x", {"kafka": external})


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
        # an API token is projected only where it is needed: into the Ray autoscaler sidecar
        token_volumes = {
            v["name"]
            for v in spec.get("volumes", [])
            if any("serviceAccountToken" in src for src in dig(v, "projected.sources") or [])
        }
        for c in pod_containers(pod):
            mounted = {m["name"] for m in c.get("volumeMounts", [])} & token_volumes
            if mounted and c["name"] != "autoscaler":
                errors.append(f"{w}/{c['name']}: mounts a Kubernetes API token {mounted}")
        for c in pod_containers(pod):
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
        for c in pod_containers(pod):
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


def _gpus(pod: PodSpec) -> bool:
    return any(
        "nvidia.com/gpu" in (dig(c, "resources.limits") or {}) for c in pod.spec["containers"]
    )


def test_gpu_placement(render: Render) -> None:
    """GPU renders: TF Serving's GPU image with nvidia.com/gpu, one pod per node, and the training
    pods that train (both Jobs, resnet50's Ray Train workers, mitosis's RayJob head, whose driver
    trains) on GPUs with the prolifscore-gpu image; CPU renders request no GPU anywhere."""
    trains_on_gpu = {"gpu"} <= render.features or render.value("training.job.gpu", False)
    tf_pod, tf = the_pod(render, "model-server")
    if "gpu" not in render.features:
        assert not _gpus(tf_pod) and not tf["image"].endswith("-gpu")
    else:
        assert _gpus(tf_pod) and tf["image"].endswith("-gpu")
        affinity = dig(tf_pod.spec, "affinity.podAntiAffinity") or {}
        assert render.is_helm or affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    rayjob_model = {
        rj["metadata"]["name"]: rj["spec"]["entrypoint"].split()[2]
        for rj in render.of_kind("RayJob")
    }
    for pod in pod_specs(render):
        c = pod.spec["containers"][0]
        component = pod.labels.get("app.kubernetes.io/component")
        if pod.where.startswith("Job/"):
            wanted = bool(trains_on_gpu)
        elif pod.where.startswith("RayJob/"):
            # resnet50 trains on the workers; mitosis in the driver, on the head
            model = rayjob_model[pod.where.split("/")[1]]
            trainer = component == "training-ray-worker" or model == "mitosis"
            wanted = trainer and bool(
                {"gpu"} <= render.features or render.value("training.rayJob.gpu", False)
            )
        else:
            wanted = component == "model-server" and "gpu" in render.features
        assert _gpus(pod) == wanted, pod.where
        if wanted and is_ours(c):
            assert "/prolifscore-gpu" in c["image"], pod.where


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
            if component in grpc_servers(render):
                grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
                tls = effective_env(render, c).get("PROLIF_TLS_CERT_FILE")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    check = c[probe].get("grpc") or c[probe].get("tcpSocket")
                    if not check or port_number(c, check["port"]) != grpc_port:
                        errors.append(f"{pod.where}: {probe} not on the gRPC port {grpc_port}")
                    # the kubelet's gRPC probe speaks plaintext: TCP with TLS, gRPC without
                    if ("tcpSocket" in c[probe]) != bool(tls):
                        errors.append(f"{pod.where}: {probe} {c[probe]} with TLS={bool(tls)}")
                    # liveness must not fail with the broker (a restart would not bring it back):
                    # it asks for the name that stays SERVING; readiness and startup for ""
                    wanted = LIVENESS if probe == "livenessProbe" else ""
                    if "grpc" in c[probe] and c[probe]["grpc"].get("service", "") != wanted:
                        errors.append(f"{pod.where}: {probe} must ask for {wanted!r}")
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
        assert "network-policies" not in render.features
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

    kafka_ports = (
        {9093} if "bundled-kafka" in render.features else set(render.value("kafka.externalPorts"))
    )
    kafka_clients = [*grpc_services(render), "training-job", "training-ray-head"]
    for component in kafka_clients:
        if not any(p.labels.get("app.kubernetes.io/component") == component for p in pods):
            continue
        ports = egress_ports(component)
        assert 53 in ports and kafka_ports <= ports, (component, ports)
        if component in grpc_services(render) and render.of_kind("RayCluster"):
            assert 10001 in ports, component
    assert 8500 in egress_ports("scoring")
    if "ray-autoscaling" in render.features:
        assert {443, 6443} <= egress_ports("ray-head"), "the autoscaler reaches the API server"
    # Strimzi's listener policy admits exactly the Kafka client pods of this render
    present = {p.labels.get("app.kubernetes.io/component") for p in pods}
    for kafka in render.of_kind("Kafka"):
        peers = [
            peer["podSelector"]
            for listener in kafka["spec"]["kafka"]["listeners"]
            for peer in listener["networkPolicyPeers"]
            if "podSelector" in peer
        ]
        admitted = {
            p.labels["app.kubernetes.io/component"]
            for p in pods
            if any(matches(peer, p.labels) for peer in peers)
        }
        assert admitted == set(kafka_clients) & present, admitted


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
    for component in grpc_services(render):
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
    for component in grpc_services(render):
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
            for component in grpc_services(render):
                _, c = the_pod(render, component)
                token = next(e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN")
                assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


def test_kafka_bootstrap_topics_and_sizes(render: Render) -> None:
    _, tiling = the_pod(render, "tiling")
    env = effective_env(render, tiling)
    bootstrap = env["PROLIF_KAFKA_BOOTSTRAP"] or ""
    expected_topics = code_topics()
    for component in grpc_services(render):
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
        # the one listener: TLS and SCRAM-SHA-512, no plaintext one
        (listener,) = kafka["spec"]["kafka"]["listeners"]
        assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
        assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
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
    # version labels (`prolifscore models promote`) may name a version still loading
    assert args.get("allow_version_labels_for_unavailable_models") == "true"
    # batching: one Predict of PROLIF_PREDICT_BATCH tiles must fit in a batch. Parsed (and
    # checked: allowed sizes increasing, the last = max_batch_size) by the local model server's
    # reader of the same file, which follows TF Serving's BatchingParameters.
    if args.get("enable_batching") == "true":
        from prolifscore.modelserver.batching import parse_batching_parameters

        batching = parse_batching_parameters(
            configmap_file(render, tf_pod, tf, args["batching_parameters_file"])
        )
        predict_batch = int(env.get("PROLIF_PREDICT_BATCH") or settings["PROLIF_PREDICT_BATCH"][0])
        assert batching.max_batch_size >= predict_batch
        # a full Predict is never padded; a slide's last, smaller one is padded to a few shapes
        assert predict_batch in batching.allowed_batch_sizes, batching.allowed_batch_sizes
        # tuned for the hardware: a GPU runs one batch at a time, so few batch threads and
        # batches of several Predicts; on CPUs, up to one thread per CPU
        limits = tf["resources"]["limits"]
        gpus = int(quantity(limits.get("nvidia.com/gpu", 0)))
        if gpus:
            assert batching.num_batch_threads <= 2 * gpus
            assert batching.max_batch_size >= 2 * predict_batch
        else:
            assert batching.num_batch_threads <= quantity(limits["cpu"])
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
    # Ray workers run the tiling tasks, filter actors and the training service's Ray Train
    # workers (checkpoints under the run folder): same paths as the services
    _, filtering = the_pod(render, "filtering")
    fenv = effective_env(render, filtering)
    for pod in pod_specs(render):
        if pod.labels.get("app.kubernetes.io/component") == "ray-worker":
            c = pod.spec["containers"][0]
            assert mount_for(c, fenv["PROLIF_SLIDE_ROOTS"] or "")["readOnly"] is True
            assert not mount_for(c, fenv["PROLIF_TILES_ROOT"] or "").get("readOnly")
            if "training-service" in render.features:
                _, training = the_pod(render, "training")
                runs = effective_env(render, training)["PROLIF_RUNS_ROOT"] or ""
                assert not mount_for(c, runs).get("readOnly"), "Ray Train checkpoints"
        if pod.extra.get("ray"):
            shm = mount_for(pod.spec["containers"][0], "/dev/shm")
            volume = next(v for v in pod.spec["volumes"] if v["name"] == shm["name"])
            assert volume["emptyDir"]["medium"] == "Memory", pod.where


def _training_runs(render: Render) -> list[tuple[str, list[str], PodSpec, Obj]]:
    """(where, argv, driver pod, driver container) of every training Job and RayJob."""
    runs = []
    for job in render.of_kind("Job"):
        pod = next(p for p in pod_specs(render) if p.where == f"Job/{job['metadata']['name']}")
        runs.append(
            (pod.where, pod.spec["containers"][0]["command"], pod, pod.spec["containers"][0])
        )
    for rj in render.of_kind("RayJob"):
        name = rj["metadata"]["name"]
        head = next(p for p in pod_specs(render) if p.where == f"RayJob/{name}/head")
        runs.append(
            (f"RayJob/{name}", rj["spec"]["entrypoint"].split(), head, head.spec["containers"][0])
        )
    return runs


def test_training_job_and_rayjob(render: Render) -> None:
    """One Job and one RayJob per model; each created suspended, trains in the right place and
    keeps its outputs on the volumes."""
    for job in render.of_kind("Job"):
        pod = next(p for p in pod_specs(render) if p.where == f"Job/{job['metadata']['name']}")
        c = pod.spec["containers"][0]
        assert job["spec"]["suspend"] is True, "training starts only when asked"
        env = effective_env(render, c)
        assert env["PROLIF_RAY_ADDRESS"] == "", "the Job trains with a Ray inside its pod"
        assert int(env["PROLIF_RAY_NUM_CPUS"] or 0) <= quantity(c["resources"]["limits"]["cpu"])
        assert env["PROLIF_TRAIN_WORKERS"] == "1"
        # a retried pod resumes its run: the run id is the Job's, via $(JOB_UID)
        uid = next(e for e in c["env"] if e["name"] == "JOB_UID")
        assert "controller-uid" in uid["valueFrom"]["fieldRef"]["fieldPath"]
        assert any("$(JOB_UID)" in arg for arg in c["command"])
        _check_training_mounts(pod, c, env)
    for rj in render.of_kind("RayJob"):
        name = rj["metadata"]["name"]
        assert rj["spec"]["suspend"] is True and rj["spec"]["shutdownAfterJobFinishes"] is True
        cluster = rj["spec"]["rayClusterSpec"]
        head = next(p for p in pod_specs(render) if p.where == f"RayJob/{name}/head")
        env = effective_env(render, head.spec["containers"][0])
        # resnet50: one Ray Train worker per worker pod; mitosis trains in the driver (no workers)
        workers = sum(g["replicas"] for g in cluster.get("workerGroupSpecs", []))
        model = rj["spec"]["entrypoint"].split()[2]
        assert (workers > 0) == (model == "resnet50"), name
        assert int(env["PROLIF_TRAIN_WORKERS"] or 0) == max(workers, 1), name
        for pod in pod_specs(render):
            if pod.where.startswith(f"RayJob/{name}/"):
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
    """Every Job command and RayJob entrypoint parses with `prolifscore train`'s parser, reads its
    data set from the tiles volume, announces its export, and together they train both models TF
    Serving serves (each kind of run, when it is on)."""
    tf_pod, tf = the_pod(render, "model-server")
    args = dict(a.removeprefix("--").split("=", 1) for a in tf["args"])
    served = set(
        re.findall(
            r'name:\s*"([^"]+)"', configmap_file(render, tf_pod, tf, args["model_config_file"])
        )
    )
    trained: dict[str, set[str]] = {"Job": set(), "RayJob": set()}
    for where, argv, _, container in _training_runs(render):
        parsed = _parse_train_command(argv)
        assert parsed.command == "train", where
        assert parsed.model in served, f"{where}: trains {parsed.model}, TF Serving serves {served}"
        mount = mount_for(container, parsed.dataset)
        assert mount is not None and mount["name"] == "tiles", f"{where}: dataset {parsed.dataset}"
        # `prolifscore train --publish` announces the export on prolif.models (ModelPublished),
        # as the training service does; parsed by the real CLI.
        assert parsed.publish is True, f"{where}: the run must announce its model (--publish)"
        trained[where.split("/")[0]].add(parsed.model)
    models = set(render.value("training.models", ["resnet50", "mitosis"]))
    assert trained["Job"] == (models if "job" in render.features else set())
    assert trained["RayJob"] == (models if "rayjob" in render.features else set())
    if not render.is_helm:
        assert models == served, "both served models are trained on the cluster"
    with pytest.raises(AssertionError):
        _parse_train_command(["prolifscore", "train", "resnet50"])  # --dataset is required


def test_training_path_roots_are_absolute(render: Render) -> None:
    """Every process that trains (the service, the Jobs, the RayJobs' drivers) confines request
    paths to absolute roots: the code's defaults are relative, so they would resolve against
    the image's working directory. Data sets under /data (the tiles volume is there), weights
    under /data/weights."""
    trainers = {"training", "training-job", "training-ray-head"}
    seen: set[str] = set()
    for pod in pod_specs(render):
        component = pod.labels.get("app.kubernetes.io/component")
        if component not in trainers:
            continue
        for c in containers(pod.spec):
            if not is_ours(c):
                continue
            env = effective_env(render, c)
            assert env.get("PROLIF_DATA_ROOTS") == "/data", pod.where
            assert env.get("PROLIF_WEIGHTS_ROOTS") == "/data/weights", pod.where
            seen.add(str(component))
    expected = {"training"} if "training" in grpc_servers(render) else set()
    assert seen >= expected, seen


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


def test_operator_guide(renders: dict[str, Render]) -> None:
    """docs/kubernetes.md walks through install, scale, upgrade and rollback, names every
    component, and its table of Kafka users says what the base's KafkaUsers grant."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    for needle in (
        "kubectl apply -k",
        "helm install",
        "helm upgrade",
        "helm rollback",
        "rollout undo",
        "## Scaling",
        "## Upgrade",
        "## Rollback",
        "make k8s-validate",
    ):
        assert needle in text, needle
    for component in (K8S_DIR / "components").iterdir():
        assert f"components/{component.name}" in text, component.name
    from tests.deploy.test_kafka_auth import rendered_acls

    base = {
        u["metadata"]["name"]: rendered_acls(u)
        for u in renders["kustomize/base"].of_kind("KafkaUser")
    }
    rows = re.findall(r"^\| `(prolifscore-\w+)`[^|]*\|([^|]*)\|([^|]*)\|([^|]*)\|", text, re.M)
    documented = {}
    for user, *columns in rows:
        ops = {}
        for column, op in zip(columns, ("Read", "Write", "Describe"), strict=True):
            for topic in re.findall(r"`(prolif\.[a-z.]+)`", column):
                ops[topic] = op
        documented[user] = ops
    for user, acls in base.items():
        strongest = {
            name: next(op for op in ("Read", "Write", "Describe") if op in ops)
            for (kind, name), ops in acls.items()
            if kind == "topic"
        }
        assert documented[user] == strongest, user
