"""The viewer on Kubernetes: its Deployment, Service and PodDisruptionBudget where the render has
it; it reads slides and the results scoring writes through read-only mounts of the same claims;
its ports, probes and environment are what ViewerSettings reads; only labelled clients and the
ingress controller reach its HTTP port, Prometheus its metrics, nobody its gRPC health port; it
is not a Kafka or Ray client; the image carries its OpenSeadragon files."""

from __future__ import annotations

import re

from tests.deploy.manifests import (
    ROOT,
    Obj,
    PodSpec,
    Render,
    code_default,
    dig,
    effective_env,
    matches,
    mount_for,
    pod_specs,
    quantity,
    the_pod,
    volume_of,
)


def _viewer(render: Render) -> tuple[PodSpec, Obj, dict[str, str | None]] | None:
    """The viewer's pod, container and environment, where the render has a viewer."""
    if "viewer" not in render.features:
        assert not [p for p in pod_specs(render) if p.where.endswith("-viewer")]
        return None
    pod, c = the_pod(render, "viewer")
    return pod, c, effective_env(render, c)


def _service(render: Render, component: str) -> Obj:
    (svc,) = [
        s
        for s in render.of_kind("Service")
        if s["spec"]["selector"].get("app.kubernetes.io/component") == component
    ]
    return svc


def test_viewer_env_is_what_viewer_settings_read(render: Render) -> None:
    from prolifscore.core.runtime.settings import describe, load
    from prolifscore.viewer.config import ViewerSettings

    found = _viewer(render)
    if found is None:
        return
    pod, c, env = found
    assert not c.get("envFrom"), "the shared ConfigMap carries Kafka and Ray settings"
    assert set(env) <= {var for var, _, _ in describe(ViewerSettings)}, set(env)
    settings = load(ViewerSettings, environ={k: v for k, v in env.items() if v is not None})
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert settings.port == ports["http"] == int(code_default("PROLIF_VIEWER_PORT"))
    assert settings.runtime.grpc_port == ports["grpc"]
    assert settings.runtime.metrics_port == ports["metrics"]
    assert settings.runtime.bind_host == "0.0.0.0", "127.0.0.1 is unreachable from the Service"
    assert pod.spec["terminationGracePeriodSeconds"] > settings.runtime.shutdown_grace_s
    # the tile cache lives in the container's memory
    limit = dig(c, "resources.limits.memory")
    assert settings.tile_cache_mb * 2**20 < quantity(limit), (settings.tile_cache_mb, limit)
    svc = _service(render, "viewer")
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["http"]["port"] == settings.port and by_name["http"]["targetPort"] == "http"
    assert {"grpc", "metrics"} <= set(by_name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = c[probe].get("grpc") or c[probe].get("tcpSocket")
        assert check["port"] in (ports["grpc"], "grpc"), probe


def test_viewer_reads_slides_and_results_read_only(render: Render) -> None:
    """Read-only mounts of the claims scoring reads slides from and writes results to."""
    found = _viewer(render)
    if found is None:
        return
    pod, c, env = found
    scoring_pod, scoring = the_pod(render, "scoring")
    senv = effective_env(render, scoring)
    for var, scoring_writes in (("PROLIF_SLIDE_ROOTS", False), ("PROLIF_RESULTS_ROOT", True)):
        mount = mount_for(c, env[var] or "")
        assert mount is not None and mount.get("readOnly") is True, var
        claim = volume_of(pod, mount)["persistentVolumeClaim"]
        assert claim.get("readOnly") is True, var
        smount = mount_for(scoring, senv[var] or "")
        assert smount is not None and bool(smount.get("readOnly")) is not scoring_writes, var
        sclaim = volume_of(scoring_pod, smount)["persistentVolumeClaim"]["claimName"]
        assert claim["claimName"] == sclaim, f"{var}: the viewer reads another volume"
        # same folder inside the volume: the viewer finds the files where scoring puts them
        assert (env[var] or "").removeprefix(mount["mountPath"]) == (senv[var] or "").removeprefix(
            smount["mountPath"]
        ), var
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod.spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert len(claims) == 2, f"the viewer mounts only slides and results: {claims}"
    names = {v["name"] for v in pod.spec["volumes"]}
    assert "kafka-credentials" not in names and "dshm" not in names
    assert not [e for e in c.get("env", []) if e["name"].startswith(("RAY_", "PROLIF_KAFKA"))]


def _admitted_ports(render: Render, target: dict[str, str], ns: str, labels: dict[str, str]):
    """Ports of a pod (labels `target`, in the release's namespace) that a client pod in namespace
    `ns` with `labels` may open, from the render's NetworkPolicies (None: no policy selects it)."""
    home = render.objects[0]["metadata"].get("namespace", "prolifscore")
    ns_labels = {"kubernetes.io/metadata.name": ns}
    selecting = [
        p
        for p in render.of_kind("NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], target)
    ]
    if not selecting:
        return None
    ports: set[int] = set()
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = matches(ns_sel, ns_labels) if ns_sel is not None else ns == home
                if ns_ok and (pod_sel is None or matches(pod_sel, labels)):
                    ports |= {p["port"] for p in rule.get("ports", [])}
    return ports


def test_only_labelled_clients_and_the_ingress_controller_reach_the_viewer(render: Render) -> None:
    found = _viewer(render)
    if found is None or "network-policies" not in render.features:
        return
    pod, c, _ = found
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    client = dict(render.value("networkPolicy.viewerClientLabels", {}) or {}) or {
        "prolifscore.io/viewer-client": "true"
    }
    ingress_ns = (render.value("networkPolicy.viewerClientNamespaces") or ["ingress-nginx"])[0]
    monitoring = render.value("networkPolicy.monitoringNamespace", "monitoring")
    home = render.objects[0]["metadata"].get("namespace", "prolifscore")

    def admitted(ns: str, labels: dict[str, str]) -> set[int]:
        return _admitted_ports(render, pod.labels, ns, labels) or set()

    assert admitted("team-a", client) == {ports["http"]}
    assert admitted(home, client) == {ports["http"]}
    assert admitted(ingress_ns, {"app": "controller"}) == {ports["http"]}
    assert admitted(monitoring, {"app": "prometheus"}) == {ports["metrics"]}
    # unlabelled pods, ours included (scoring), get nothing; nobody gets the gRPC health port
    assert admitted(home, {}) == set() and admitted("team-a", {}) == set()
    _, scoring = the_pod(render, "scoring")
    scoring_pod = next(p for p in pod_specs(render) if p.spec["containers"][0] is scoring)
    assert admitted(home, scoring_pod.labels) == set()
    # the viewer calls nothing: no egress but DNS
    egress = {
        port["port"]
        for p in render.of_kind("NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod.labels)
        for rule in p["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }
    assert egress == {53}


def test_viewer_is_monitored_and_alerted_on(render: Render) -> None:
    found = _viewer(render)
    if found is None or "monitoring" not in render.features:
        return
    svc = _service(render, "viewer")
    assert any(
        matches(m["spec"]["selector"], svc["metadata"]["labels"])
        and [e["port"] for e in m["spec"]["endpoints"]] == ["metrics"]
        for m in render.of_kind("ServiceMonitor")
    )
    rules = [
        r
        for rule in render.of_kind("PrometheusRule")
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    ]
    down = next(r for r in rules if r["alert"] == "ProlifServiceDown")
    watched = re.search(r'app_kubernetes_io_component=~"([^"]+)"', down["expr"]).group(1)
    assert "viewer" in watched.split("|")


def test_the_image_carries_the_viewers_browser_files() -> None:
    """Read-only root file system: OpenSeadragon must come inside the package, installed by npm
    in the image's build stage before the package is installed."""
    import tomllib

    from prolifscore.viewer import server

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = data["tool"]["setuptools"]["package-data"]["prolifscore.viewer"]
    assert "web/node_modules/openseadragon/build/openseadragon/*.js" in files
    package = ROOT / "services" / "prolifscore" / "viewer"
    assert server.OSD_BUILD.is_relative_to(package), "served from the installed package"
    docker = (ROOT / "Dockerfile").read_text()
    npm = docker.index("cd services/prolifscore/viewer/web && npm ci")
    assert npm < docker.index("pip install --no-deps .")
    assert data["project"]["scripts"]["prolifscore-viewer"] == "prolifscore.viewer.server:main"
