"""Kafka authentication and authorization: TLS + SCRAM-SHA-512 on the bundled Strimzi cluster, one
KafkaUser per service whose ACLs name exactly the topics and consumer group the service's code
uses (read from the servers' code itself), every Kafka client pod wired to its own credentials,
KEDA reading lag with its own Describe-only user, and the chart's external mode with TLS / SASL.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import PurePosixPath

from tests.deploy.manifests import (
    ROOT,
    Obj,
    PodSpec,
    Render,
    code_settings,
    dig,
    effective_env,
    grpc_services,
    is_ours,
    mount_for,
    pod_specs,
    service_of,
    volume_of,
)

SERVICES_DIR = ROOT / "services" / "prolifscore"
# Where each Kafka-using service's code publishes, consumes and lists topics; `prolifscore train
# --publish` (cli/train.py) announces models with the training user.
CODE = {
    "tiling": ["tiling/server.py"],
    "filtering": ["filtering/server.py"],
    "scoring": ["scoring/server.py"],
    "training": ["training/server.py", "cli/train.py"],
}
# Shared code the services call: the consume loop (dead-letters undecodable records) and the
# failure helpers (dead letter + FAILED status), where they exist.
SHARED_CODE = ["core/runtime/service.py", "core/runtime/failures.py"]


@dataclasses.dataclass
class KafkaUse:
    """What a service does on Kafka, as setting names (PROLIF_* variables)."""

    reads: set[str] = dataclasses.field(default_factory=set)
    writes: set[str] = dataclasses.field(default_factory=set)
    lists: set[str] = dataclasses.field(default_factory=set)
    groups: set[str] = dataclasses.field(default_factory=set)
    calls: set[str] = dataclasses.field(default_factory=set)

    def add(self, other: KafkaUse) -> None:
        for f in ("reads", "writes", "lists", "groups"):
            getattr(self, f).update(getattr(other, f))


def _setting_vars(service: str) -> dict[str, str]:
    """Settings attribute name -> variable for a service (its own fields over KafkaSettings')."""
    from prolifscore.cli.main import all_settings
    from prolifscore.core.runtime.settings import KafkaSettings

    names = {f.name: f.metadata["env"] for f in dataclasses.fields(KafkaSettings)}
    for f in dataclasses.fields(all_settings()[service]):
        if "env" in f.metadata:
            names[f.name] = f.metadata["env"]
    return names


def _attrs(node: ast.AST) -> list[str]:
    return [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]


def _read_use(tree: ast.AST, names: dict[str, str]) -> KafkaUse:
    """The Kafka calls in some code: publish / publish_bytes / dead_letter targets, consume_loop
    and KafkaWork (consumed topic, group, topics listed at start), ensure_topics lists, and the
    names of the functions it calls."""
    use = KafkaUse()
    assigned: dict[str, set[str]] = {}

    def topics(node: ast.AST | None) -> set[str]:
        if node is None:
            return set()
        found = {names[a] for a in _attrs(node) if a.startswith("topic_") and a in names}
        if isinstance(node, ast.Name):  # a local holding a topic (`topic = k.topic_tasks`)
            found |= assigned.get(node.id, set())
        return found

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, set()).update(topics(node.value))
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        use.calls.add(name)
        keywords = {k.arg: k.value for k in call.keywords}
        if name in ("publish", "publish_bytes"):
            use.writes |= topics(call.args[0])
        elif name == "dead_letter":
            use.writes.add(names["topic_dlq"])
        elif name == "ensure_topics":
            use.lists |= topics(call.args[0])
        elif name == "consume_loop" and len(call.args) >= 4:
            use.reads |= topics(call.args[2])
            use.groups |= {names[a] for a in _attrs(call.args[3]) if a in names}
        elif name == "KafkaWork":
            use.reads |= topics(keywords.get("consume"))
            use.lists |= topics(keywords.get("produce")) | {names["topic_dlq"]}
            use.groups |= {names[a] for a in _attrs(keywords["group_id"]) if a in names}
    return use


def _shared_functions(names: dict[str, str]) -> dict[str, KafkaUse]:
    """Kafka use of each function of the shared code, with what the functions it calls there do."""
    found: dict[str, KafkaUse] = {}
    for rel in SHARED_CODE:
        path = SERVICES_DIR / rel
        if path.exists():
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef) and node.name != "consume_loop":
                    found[node.name] = _read_use(node, names)
    for _ in range(3):  # helpers calling helpers
        for use in found.values():
            for callee in use.calls & set(found):
                use.add(found[callee])
    return found


@functools.cache
def code_kafka_use(service: str) -> KafkaUse:
    """The service's Kafka use, read from its code and the shared code it calls."""
    names = _setting_vars(service)
    shared = _shared_functions(names)
    use = KafkaUse()
    for rel in CODE[service]:
        found = _read_use(ast.parse((SERVICES_DIR / rel).read_text()), names)
        use.add(found)
        for callee in found.calls & set(shared):
            use.add(shared[callee])
        if {"consume_loop", "KafkaWork", "run_service"} & found.calls and _loop_dead_letters():
            use.writes.add(names["topic_dlq"])  # records the consume loop cannot decode
    return use


@functools.cache
def _loop_dead_letters() -> bool:
    tree = ast.parse((SERVICES_DIR / "core/runtime/service.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "consume_loop")
    return "dead_letter" in _attrs(loop)


def test_code_reading_finds_what_the_services_do() -> None:
    """The code reading above sees the flows of the README's data-flow diagram."""
    tiling, training = code_kafka_use("tiling"), code_kafka_use("training")
    assert tiling.reads == {"PROLIF_TOPIC_INGEST"} and tiling.groups == {"PROLIF_TILING_GROUP"}
    assert {"PROLIF_TOPIC_TASKS", "PROLIF_TOPIC_STATUS", "PROLIF_TOPIC_DLQ"} <= tiling.writes
    assert training.writes == {"PROLIF_TOPIC_MODELS", "PROLIF_TOPIC_DLQ"}
    assert code_kafka_use("scoring").reads == {"PROLIF_TOPIC_SCORE_REQUESTS"}


def _value(render: Render, pod_env: dict[str, str | None], var: str) -> str:
    return pod_env.get(var) or code_settings()[var][0]


def expected_acls(render: Render, service: str) -> dict[tuple[str, str], set[str]]:
    """(resource type, name) -> operations the service's code needs, names as its pod sees them."""
    _, c = next(
        (p, p.spec["containers"][0])
        for p in pod_specs(render)
        if p.labels.get("app.kubernetes.io/component") in (service, "training-job")
        and service_of(p.spec["containers"][0]) == service
    )
    env = effective_env(render, c)
    use = code_kafka_use(service)
    acls: dict[tuple[str, str], set[str]] = {}
    for var in use.reads | use.writes | use.lists:
        ops = {"Describe"} | ({"Read"} if var in use.reads else set())
        acls[("topic", _value(render, env, var))] = ops | (
            {"Write"} if var in use.writes else set()
        )
    for var in use.groups:
        acls[("group", _value(render, env, var))] = {"Read"}
    return acls


def rendered_acls(user: Obj) -> dict[tuple[str, str], set[str]]:
    acls: dict[tuple[str, str], set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        res = acl["resource"]
        assert res.get("patternType", "literal") == "literal", "no prefix wildcards"
        acls.setdefault((res["type"], res["name"]), set()).update(acl["operations"])
    return acls


def kafka_user(render: Render, service: str) -> Obj:
    users = [
        u for u in render.of_kind("KafkaUser") if u["metadata"]["name"].endswith(f"-{service}")
    ]
    assert len(users) == 1, f"{render.name}: one KafkaUser for {service}"
    return users[0]


def test_one_kafka_user_per_service_with_exactly_its_acls(render: Render) -> None:
    if "bundled-kafka" not in render.features:
        return
    clients = set(grpc_services(render)) | {"training"}  # the training Jobs/RayJobs use it too
    for service in clients:
        user = kafka_user(render, service)
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert rendered_acls(user) == expected_acls(render, service), service
    expected = clients | ({"keda"} if "keda" in render.features else set())
    names = {u["metadata"]["name"].rsplit("-", 1)[1] for u in render.of_kind("KafkaUser")}
    assert names == expected, "no user without a client, no client without a user"


def file_source(pod: PodSpec, container: Obj, path: str) -> tuple[str, str]:
    """(Secret, key) a file the container reads comes from, through its mounts and volumes."""
    mount = mount_for(container, path)
    assert mount is not None, f"{pod.where}: {path} is not mounted"
    volume = volume_of(pod, mount)
    rel = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    sources = dig(volume, "projected.sources") or [{"secret": volume.get("secret")}]
    for src in sources:
        secret = src.get("secret") or {}
        for item in secret.get("items") or []:
            if item["path"] == rel:
                return secret["name"], item["key"]
        if secret and not secret.get("items") and "secretName" in secret:
            return secret["secretName"], rel
    raise AssertionError(f"{pod.where}: {path} comes from no Secret")


def kafka_clients(render: Render) -> list[tuple[PodSpec, Obj, str]]:
    """(pod, container, the service whose user it is) of every Kafka client container: the
    services, the training Jobs and the RayJob drivers (heads)."""
    found = []
    for pod in pod_specs(render):
        c = pod.spec["containers"][0]
        component = pod.labels.get("app.kubernetes.io/component")
        if not is_ours(c):
            continue
        if component in grpc_services(render) or component in ("training-job", "training-ray-head"):
            found.append((pod, c, "training" if component.startswith("training") else component))
    return found


def expected_security(render: Render) -> Obj:
    if "bundled-kafka" in render.features:
        kafka = render.of_kind("Kafka")[0]["metadata"]["name"]
        return {
            "protocol": "SASL_SSL",
            "mechanism": "SCRAM-SHA-512",
            "ca": (f"{kafka}-cluster-ca-cert", "ca.crt"),
            "cert": "",
        }
    e = render.value("kafka.external")
    tls = e["securityProtocol"] in ("SSL", "SASL_SSL")
    return {
        "protocol": e["securityProtocol"],
        "mechanism": e["saslMechanism"] if "SASL" in e["securityProtocol"] else "",
        "ca": (e["caSecret"], e["caKey"]) if tls and e["caSecret"] else None,
        "cert": e["clientCertSecret"] if e["securityProtocol"] == "SSL" else "",
    }


def expected_user(render: Render, service: str) -> tuple[str, str, str]:
    """(user name, password Secret, key) of a service."""
    if "bundled-kafka" in render.features:
        name = kafka_user(render, service)["metadata"]["name"]
        return name, name, "password"
    u = render.value(f"kafka.external.users.{service}")
    return u["username"], u["passwordSecret"], u["passwordKey"]


def test_every_kafka_client_uses_its_own_credentials(render: Render) -> None:
    sec = expected_security(render)
    clients = kafka_clients(render)
    assert {s for _, _, s in clients} >= set(grpc_services(render))
    for pod, c, service in clients:
        env = effective_env(render, c)
        assert env["PROLIF_KAFKA_SECURITY_PROTOCOL"] == sec["protocol"], pod.where
        assert env.get("PROLIF_KAFKA_SASL_PASSWORD") is None, "passwords only from files"
        if sec["mechanism"]:
            user, secret, key = expected_user(render, service)
            assert env["PROLIF_KAFKA_SASL_MECHANISM"] == sec["mechanism"]
            assert env["PROLIF_KAFKA_SASL_USERNAME"] == user, pod.where
            password = env["PROLIF_KAFKA_SASL_PASSWORD_FILE"] or ""
            assert file_source(pod, c, password) == (secret, key), pod.where
        else:
            assert not env.get("PROLIF_KAFKA_SASL_USERNAME"), pod.where
        if sec["ca"]:
            assert file_source(pod, c, env["PROLIF_KAFKA_SSL_CA_FILE"] or "") == sec["ca"]
        if sec["cert"]:
            assert file_source(pod, c, env["PROLIF_KAFKA_SSL_CERT_FILE"] or "") == (
                sec["cert"],
                "tls.crt",
            )
            assert file_source(pod, c, env["PROLIF_KAFKA_SSL_KEY_FILE"] or "") == (
                sec["cert"],
                "tls.key",
            )


def test_keda_reads_lag_with_its_own_credentials(render: Render) -> None:
    """KEDA's triggers speak the cluster's protocol with a TriggerAuthentication whose user may
    only describe the consumed topics and groups (bundled), or the user the values name."""
    sec = expected_security(render)
    for so in render.of_kind("ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        md = trigger["metadata"]
        sasl = {
            "": "none",
            "PLAIN": "plaintext",
            "SCRAM-SHA-256": "scram_sha256",
            "SCRAM-SHA-512": "scram_sha512",
        }[sec["mechanism"]]
        assert md.get("sasl", "none") == sasl
        assert md.get("tls", "disable") == ("enable" if "SSL" in sec["protocol"] else "disable")
        if sec["protocol"] == "PLAINTEXT":
            assert "authenticationRef" not in trigger
            continue
        auth = render.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth is not None
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        if sec["ca"]:
            assert refs["ca"] == sec["ca"]
        if sec["cert"]:
            assert refs["cert"] == (sec["cert"], "tls.crt") and refs["key"] == (
                sec["cert"],
                "tls.key",
            )
        if sec["mechanism"]:
            user, secret, key = expected_user(render, "keda")
            assert refs["password"] == (secret, key)
            name, username_key = refs["username"]
            username = render.get("Secret", name)
            assert username is not None
            value = (username.get("stringData") or {}).get(username_key)
            if value is None:
                import base64

                value = base64.b64decode(username["data"][username_key]).decode()
            assert value == user
        if "bundled-kafka" in render.features:
            acls = rendered_acls(kafka_user(render, "keda"))
            assert acls[("topic", md["topic"])] == {"Describe"}
            assert acls[("group", md["consumerGroup"])] == {"Describe"}
            assert all(ops == {"Describe"} for ops in acls.values()), "KEDA never consumes"
