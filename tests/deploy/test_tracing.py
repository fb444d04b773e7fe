"""Tracing on the cluster: off unless turned on (kustomize `tracing` component, Helm
`tracing.enabled`); then every process of ours exports over OTLP, by the code's own rule for
reading the settings, and may reach the collector through the NetworkPolicies."""

from __future__ import annotations

from prolifscore.core.runtime.settings import TracingSettings, load
from prolifscore.core.runtime.tracing import resolve_mode
from tests.deploy.manifests import (
    Render,
    containers,
    effective_env,
    is_ours,
    matches,
    pod_specs,
)

# The components whose processes trace (the viewer and TF Serving do not).
TRACERS = {"tiling", "filtering", "scoring", "training", "training-job", "training-ray-head"}


def test_tracing_is_off_unless_turned_on_then_otlp_everywhere(render: Render) -> None:
    on = "tracing" in render.features
    seen: set[str] = set()
    for pod in pod_specs(render):
        if pod.labels.get("app.kubernetes.io/component") not in TRACERS:
            continue
        for c in containers(pod.spec):
            if not is_ours(c):
                continue
            env = {k: v or "" for k, v in effective_env(render, c).items()}
            mode = resolve_mode(load(TracingSettings, environ=env), env)
            assert mode == ("otlp" if on else "off"), (pod.where, mode)
            if on:
                assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith(("http://", "https://"))
                assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] in ("grpc", "http/protobuf")
                # a trace is kept or dropped whole: later spans follow the first one's decision
                assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
                assert 0 <= float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1
            seen.add(pod.labels["app.kubernetes.io/component"])
    assert seen, "no process that traces"


def test_tracers_may_reach_the_collector(render: Render) -> None:
    """With NetworkPolicies, an egress rule opens the collector's OTLP port to every process
    that traces (the port its endpoint names, when it names one)."""
    policies = render.of_kind("NetworkPolicy")
    if "tracing" not in render.features or not policies:
        return
    for pod in pod_specs(render):
        if pod.labels.get("app.kubernetes.io/component") not in TRACERS:
            continue
        env = effective_env(render, pod.spec["containers"][0])
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"] or ""
        port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
        opened = {
            p["port"]
            for pol in policies
            if matches(pol["spec"]["podSelector"], pod.labels)
            for rule in pol["spec"].get("egress", [])
            if any("podSelector" in peer for peer in rule.get("to", []))
            for p in rule.get("ports", [])
        }
        assert port in opened, (pod.where, port, opened)
