"""Monitoring: a ServiceMonitor for every service's metrics port (and TF Serving's), PodMonitors
for the Ray pods and the Kafka Exporter, the alerts the issue asks for with PromQL that parses
(promql-parser) and names only metrics that exist, and the Grafana dashboard; the rules and the
dashboard are one file each, shared by kustomize and Helm."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from tests.deploy.manifests import CHART_DIR, K8S_DIR, Obj, Render, matches, pod_specs

MONITORING = K8S_DIR / "components" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "files" / "prolifscore-dashboard.json"
ALERTS = {
    "ProlifConsumerLagGrowing",
    "ProlifDeadLetters",
    "ProlifSlideFailureRateHigh",
    "ProlifModelServerUnavailable",
    "ProlifBrokerUnreachable",
    "ProlifServiceDown",
}
# Metrics from outside the code: target health (Prometheus), lag (Strimzi's Kafka Exporter).
EXTERNAL_METRICS = {"up", "kafka_consumergroup_lag"}


def code_metrics() -> set[str]:
    """The series names prolifscore.core.runtime.metrics exports (counters' _total, histograms'
    _bucket / _sum / _count, gauges as they are)."""
    from prometheus_client import Counter, Gauge, Histogram

    from prolifscore.core.runtime import metrics

    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            names.add(f"{obj._name}_total")
        elif isinstance(obj, Histogram):
            names |= {f"{obj._name}_{s}" for s in ("bucket", "sum", "count")}
        elif isinstance(obj, Gauge):
            names.add(obj._name)
    return names


def selectors(expr: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(metric name, label matchers) of every vector selector in a PromQL expression, parsed by
    promql-parser (a syntax error raises)."""
    import promql_parser

    def walk(node: object) -> Iterator[tuple[str, dict[str, str]]]:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in node.matchers.matchers}
            yield node.name, labels
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "args", "param"):
            child = getattr(node, attr, None)
            if child is None:
                continue
            for item in child if isinstance(child, list) else [child]:
                yield from walk(item)

    yield from walk(promql_parser.parse(expr))


def check_promql(expr: str) -> list[str]:
    known = code_metrics() | EXTERNAL_METRICS
    found = list(selectors(expr))
    errors = [f"{expr}: no metric" for _ in [0] if not found]
    errors += [f"{expr}: unknown metric {name}" for name, _ in found if name not in known]
    services = {"tiling", "filtering", "scoring", "training", "modelserver"}
    for _, labels in found:
        for value in labels.get("service", "").split("|"):
            if value and value not in services:
                errors.append(f"{expr}: no service {value}")
    return errors


def test_promql_checks_catch_mistakes() -> None:
    assert check_promql("sum(rate(prolif_slides_total[5m]))") == []
    assert check_promql("rate(prolif_slide_total[5m])")  # a typo'd metric
    assert check_promql('up{service="tilling"}')
    try:
        check_promql("sum by (service) (rate(prolif_slides_total[5m])")
    except ValueError:
        pass
    else:
        raise AssertionError("unbalanced PromQL must not parse")


def _rules(render: Render) -> list[Obj]:
    return [
        r
        for rule in render.of_kind("PrometheusRule")
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    ]


def test_alerts(render: Render) -> None:
    rules = _rules(render)
    if "monitoring" not in render.features:
        assert not rules
        return
    assert {r["alert"] for r in rules} == ALERTS
    errors = []
    for rule in rules:
        errors += check_promql(rule["expr"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        # per installation: every alert keeps the namespace label
        assert "namespace" in rule["expr"], rule["alert"]
    assert not errors, "\n".join(errors)


def test_every_service_is_scraped(render: Render) -> None:
    """Each Service with a metrics port has a ServiceMonitor on that port; the Ray pods and the
    Kafka Exporter have PodMonitors; Prometheus may reach them (NetworkPolicy)."""
    monitors = render.of_kind("ServiceMonitor")
    if "monitoring" not in render.features:
        assert not monitors and not render.of_kind("PodMonitor")
        return
    for svc in render.of_kind("Service"):
        ports = {p["name"] for p in svc["spec"]["ports"]} & {"metrics", "http-metrics"}
        if not ports:
            continue
        covering = [
            (m, e["port"])
            for m in monitors
            if matches(m["spec"]["selector"], svc["metadata"]["labels"])
            for e in m["spec"]["endpoints"]
        ]
        assert {port for _, port in covering} == ports, svc["metadata"]["name"]
    pods = list(pod_specs(render))
    for pm in render.of_kind("PodMonitor"):
        if "strimzi.io/name" in pm["spec"]["selector"]["matchLabels"]:
            assert render.of_kind("Kafka")[0]["spec"]["kafkaExporter"], "the exporter is on"
            continue
        scraped = [p for p in pods if matches(pm["spec"]["selector"], p.labels)]
        assert {p.labels["app.kubernetes.io/component"] for p in scraped} == {
            "ray-head",
            "ray-worker",
        }
        for p in scraped:
            assert "metrics" in {port.get("name") for port in p.spec["containers"][0]["ports"]}
    for m in [*monitors, *render.of_kind("PodMonitor")]:
        extra = render.value("monitoring.labels", {})
        assert extra.items() <= m["metadata"]["labels"].items(), "Prometheus's selector labels"


def test_dashboard(render: Render) -> None:
    maps = [
        c for c in render.of_kind("ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard")
    ]
    if "monitoring" not in render.features:
        assert not maps
        return
    (cm,) = maps
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


def test_dashboard_queries() -> None:
    board = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in board["templating"]["list"]}
    errors = []
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'namespace="$namespace"' in expr, expr
            errors += check_promql(expr.replace("$namespace", "x"))
    assert {"datasource", "namespace"} <= names
    titles = {p["title"] for p in board["panels"]}
    assert any("lag" in t.lower() for t in titles) and any("Ray workers" in t for t in titles)
    assert not errors, "\n".join(errors)


def test_rules_and_dashboard_are_written_once() -> None:
    """The chart reads the kustomize component's files through links; so do its probe and SSL
    scripts: one copy of each."""
    for name, target in {
        "prometheusrule.yaml": RULES,
        "prolifscore-dashboard.json": DASHBOARD,
        "tfserving-probe.sh": K8S_DIR / "base" / "config" / "tfserving-probe.sh",
        "tfserving-ssl-config.sh": K8S_DIR
        / "components"
        / "grpc-tls"
        / "config"
        / "tfserving-ssl-config.sh",
    }.items():
        link = CHART_DIR / "files" / name
        assert link.is_symlink(), f"{link} must link to {target}, not copy it"
        assert (link.parent / os.readlink(link)).resolve() == target.resolve()
    assert {p.name for p in (CHART_DIR / "files").iterdir()} == {
        "prometheusrule.yaml",
        "prolifscore-dashboard.json",
        "tfserving-probe.sh",
        "tfserving-ssl-config.sh",
    }
