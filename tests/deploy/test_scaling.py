"""Compute that scales with the work: KEDA adds consumer pods on Kafka lag, each pod asks the Ray
cluster for its tasks and actors, and the Ray autoscaler (as Ray's own code reads our RayCluster)
adds workers for them. Checked: every single Ray request fits one worker (else it could never be
placed), and an autoscaling cluster's ceiling covers the Ray demand of every consumer at its KEDA
maximum plus one training run; a fixed cluster at least the demand at the KEDA minimum."""

from __future__ import annotations

from tests.deploy.manifests import Render, code_settings, effective_env, the_pod
from tests.deploy.test_operators import ray_autoscaling_config


def _setting(render: Render, component: str, var: str) -> float:
    env = effective_env(render, the_pod(render, component)[1])
    return float(env.get(var) or code_settings()[var][0])


def ray_requests(render: Render) -> dict[str, tuple[float, float]]:
    """Per service pod: (CPUs of its largest single Ray request, CPUs it holds while busy), from
    its settings: tiling runs a task of PROLIF_TILING_TASK_CPUS per polled slide, filtering keeps
    PROLIF_FILTER_WORKERS actors of PROLIF_FILTER_ACTOR_CPUS, scoring PROLIF_SCORING_RAY_READERS
    one-CPU reader tasks per slide, training PROLIF_TRAIN_WORKERS Ray Train workers."""
    task = _setting(render, "tiling", "PROLIF_TILING_TASK_CPUS")
    actor = _setting(render, "filtering", "PROLIF_FILTER_ACTOR_CPUS")
    actors = _setting(render, "filtering", "PROLIF_FILTER_WORKERS")
    assert actors > 0, "0 = one actor per CPU of the whole cluster: unbounded on an autoscaler"
    requests = {
        "tiling": (task, task * _setting(render, "tiling", "PROLIF_KAFKA_MAX_POLL_RECORDS")),
        "filtering": (actor, actor * actors),
        "scoring": (1.0, _setting(render, "scoring", "PROLIF_SCORING_RAY_READERS")),
    }
    if "training-service" in render.features:
        cpus = _setting(render, "training", "PROLIF_TRAIN_CPUS_PER_WORKER")
        requests["training"] = (cpus, cpus * _setting(render, "training", "PROLIF_TRAIN_WORKERS"))
    return requests


def replicas(render: Render, component: str) -> tuple[int, int]:
    """(fewest, most) pods of a service: its ScaledObject's bounds, else its fixed count."""
    deployment = the_pod(render, component)[0].where.split("/")[1]
    for so in render.of_kind("ScaledObject"):
        if so["spec"]["scaleTargetRef"]["name"] == deployment:
            return so["spec"].get("minReplicaCount", 0), so["spec"]["maxReplicaCount"]
    count = render.get("Deployment", deployment)["spec"].get("replicas", 1)
    return count, count


def test_lag_turns_into_ray_workers(render: Render) -> None:
    clusters = render.of_kind("RayCluster")
    if not clusters:
        # each pod runs a local Ray: its compute scales with the pods, and each pod's own
        # requests must fit its own Ray
        for component, (largest, busy) in ray_requests(render).items():
            local = _setting(render, component, "PROLIF_RAY_NUM_CPUS")
            assert largest <= busy <= local, f"{component}: {busy} Ray CPUs in a {local}-CPU Ray"
        return
    (cluster,) = clusters
    groups = cluster["spec"]["workerGroupSpecs"]
    (group,) = groups
    cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    requests = ray_requests(render)
    for component, (largest, _) in requests.items():
        assert largest <= cpus, f"{component}'s Ray request of {largest} CPUs fits no worker"
    autoscaling = "ray-autoscaling" in render.features
    assert cluster["spec"]["enableInTreeAutoscaling"] is autoscaling
    demand = sum(
        busy * replicas(render, c)[1 if autoscaling else 0] for c, (_, busy) in requests.items()
    )
    if autoscaling:
        # the autoscaler's own reading of the cluster: CPU node type with min < max workers
        node = ray_autoscaling_config(cluster)["available_node_types"][group["groupName"]]
        assert node["resources"]["CPU"] == cpus and node["min_workers"] < node["max_workers"]
        assert node["max_workers"] * cpus >= demand, (
            f"{render.name}: at the KEDA maxima the services ask for {demand} Ray CPUs, the "
            f"autoscaler may add only {node['max_workers']} x {cpus}"
        )
    else:
        assert group["replicas"] * cpus >= demand, f"{render.name}: {demand} CPUs at the minimum"
