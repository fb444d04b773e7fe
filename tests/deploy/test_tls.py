"""gRPC mutual TLS: cert-manager's CA and one certificate per gRPC server (or the user's Secrets),
wired to PROLIF_TLS_CERT_FILE / KEY / CA of every service and to TF Serving's --ssl_config_file;
the script that builds TF Serving's SSLConfig is run for real on certificates made like the
Certificates ask, and a gRPC server and client with such certificates complete a mutual TLS
handshake against the name the clients dial."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    HELM_NAMESPACE,
    K8S_DIR,
    Obj,
    Render,
    configmap_file,
    effective_env,
    grpc_servers,
    pod_specs,
    the_pod,
)
from tests.deploy.test_kafka_auth import file_source

SSL_SCRIPT = K8S_DIR / "components" / "grpc-tls" / "config" / "tfserving-ssl-config.sh"
TLS_VARS = ("PROLIF_TLS_CERT_FILE", "PROLIF_TLS_KEY_FILE", "PROLIF_TLS_CA_FILE")


def _tls_secret(render: Render, service: str) -> str:
    """The Secret a service's certificate is in, as the render names it."""
    key = "modelServer" if service == "model-server" else service
    if "cert-manager" in render.features:
        cert = _certificate_for(render, service)
        return str(cert["spec"]["secretName"])
    return str(render.value(f"tls.secrets.{key}"))


def _certificate_for(render: Render, service: str) -> Obj:
    component = "model-server" if service == "model-server" else service
    found = [
        c
        for c in render.of_kind("Certificate")
        if c["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{render.name}: one Certificate for {service}"
    return found[0]


def test_services_serve_and_call_grpc_with_mutual_tls(render: Render) -> None:
    for service in grpc_servers(render):
        pod, c = the_pod(render, service)
        env = effective_env(render, c)
        if "grpc-tls" not in render.features:
            assert not any(env.get(v) for v in TLS_VARS), f"{service}: TLS is off"
            continue
        secret = _tls_secret(render, service)
        # cert, key and CA (set = client certificates required, outgoing channels verified)
        for var, key in zip(TLS_VARS, ("tls.crt", "tls.key", "ca.crt"), strict=True):
            assert file_source(pod, c, env[var] or "") == (secret, key), f"{service}: {var}"


def test_tf_serving_grpc_uses_mutual_tls(render: Render) -> None:
    tf_pod, tf = the_pod(render, "model-server")
    ssl_args = [a for a in tf["args"] if a.startswith("--ssl_config_file=")]
    if "grpc-tls" not in render.features:
        assert not ssl_args and not tf_pod.spec.get("initContainers")
        return
    (arg,) = ssl_args
    path = arg.split("=", 1)[1]
    (init,) = tf_pod.spec["initContainers"]
    script, source, output = init["command"][1:]
    assert output == path, "the init container writes the file TF Serving reads"
    out_mount = next(m for m in init["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    tf_mount = next(m for m in tf["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert out_mount["name"] == tf_mount["name"] and tf_mount.get("readOnly") is True
    volume = next(v for v in tf_pod.spec["volumes"] if v["name"] == out_mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory", "the private key stays off disk"
    for key in ("tls.crt", "tls.key", "ca.crt"):
        assert file_source(tf_pod, init, f"{source}/{key}") == (
            _tls_secret(render, "model-server"),
            key,
        )
    assert configmap_file(render, tf_pod, init, script) == SSL_SCRIPT.read_text()
    # scoring dials TF Serving by a name the TF Serving certificate carries
    if "cert-manager" in render.features:
        _, scoring = the_pod(render, "scoring")
        host = (effective_env(render, scoring)["PROLIF_MODEL_SERVER"] or "").rsplit(":", 1)[0]
        assert host in _certificate_for(render, "model-server")["spec"]["dnsNames"]


def test_cert_manager_certificates(render: Render) -> None:
    """One certificate per gRPC server, for both ends of mTLS, naming its Service, signed by an
    issuer the render has (or the one the values name)."""
    certs = render.of_kind("Certificate")
    if "cert-manager" not in render.features:
        assert not certs
        return
    namespace = render.objects[0]["metadata"].get("namespace", HELM_NAMESPACE)
    issuers = {i["metadata"]["name"]: i for i in render.of_kind("Issuer")}
    servers = [*grpc_servers(render), "model-server"]
    for service in servers:
        cert = _certificate_for(render, service)
        svc = next(
            s
            for s in render.of_kind("Service")
            if s["spec"]["selector"].get("app.kubernetes.io/component") == service
        )
        name = svc["metadata"]["name"]
        spec = cert["spec"]
        assert {name, f"{name}.{namespace}.svc"} <= set(spec["dnsNames"]), service
        assert {"server auth", "client auth"} <= set(spec["usages"]), service
        assert spec["privateKey"]["rotationPolicy"] == "Always"
        ref = spec["issuerRef"]
        if ref.get("kind", "Issuer") == "Issuer":
            issuer = issuers[ref["name"]]
            ca_secret = issuer["spec"]["ca"]["secretName"]
            ca = next(c for c in certs if c["spec"]["secretName"] == ca_secret)
            assert ca["spec"]["isCA"] is True
            assert issuers[ca["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
        else:
            assert ref == render.value("tls.certManager.issuerRef")
    assert len(certs) == len(servers) + (1 if issuers else 0), "no certificate without a server"


# ---------------------------------------------------------------------------------------------
# The certificates for real: made like the Certificates ask, used like the pods use them


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is required for tests/deploy (test certificates)"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, name: str, dns: list[str]) -> None:
    """An ECDSA P-256 certificate for `dns`, server + client auth, signed by ca.crt/ca.key (the
    Certificates' privateKey and usages)."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)
    _openssl(
        "req",
        "-new",
        "-key",
        f"{name}.key",
        "-subj",
        f"/CN={dns[0]}",
        "-out",
        f"{name}.csr",
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(
        "subjectAltName=" + ",".join(f"DNS:{d}" for d in dns) + "\n"
        "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("pki")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=cwd)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=prolifscore-ca",
        "-days",
        "2",
        "-out",
        "ca.crt",
        cwd=cwd,
    )
    _issue(cwd, "tfserving", ["prolifscore-tfserving", "prolifscore-tfserving.prolifscore.svc"])
    _issue(cwd, "scoring", ["prolifscore-scoring", "prolifscore-scoring.prolifscore.svc"])
    return cwd


def _ssl_config_type() -> type:
    """tensorflow.serving.SSLConfig (tensorflow_serving/config/ssl_config.proto), which the pip
    package does not ship: built from its four fields."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(
        name="ssl_config_test.proto", package="tensorflow.serving", syntax="proto3"
    )
    m = f.message_type.add(name="SSLConfig")
    string, boolean = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    )
    for number, (field, kind) in enumerate(
        [
            ("server_key", string),
            ("server_cert", string),
            ("custom_ca", string),
            ("client_verify", boolean),
        ],
        1,
    ):
        m.field.add(
            name=field,
            number=number,
            type=kind,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.SSLConfig")
    )


@pytest.mark.parametrize("with_ca", [True, False])
def test_ssl_config_script_builds_tf_servings_sslconfig(
    pki: Path, tmp_path: Path, with_ca: bool
) -> None:
    """The init container's script, run with bash on a Secret's files, writes a text SSLConfig
    that protobuf parses back to exactly those PEM texts (client_verify with a CA)."""
    from google.protobuf import text_format

    bash = shutil.which("bash")
    assert bash, "bash is required for tests/deploy"
    secret = tmp_path / "tls"
    secret.mkdir()
    (secret / "tls.crt").write_text((pki / "tfserving.crt").read_text())
    (secret / "tls.key").write_text((pki / "tfserving.key").read_text())
    if with_ca:
        (secret / "ca.crt").write_text((pki / "ca.crt").read_text())
    out = tmp_path / "ssl.config"
    subprocess.run(
        [bash, str(SSL_SCRIPT), str(secret), str(out)],
        check=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    config = text_format.Parse(out.read_text(), _ssl_config_type()())
    assert config.server_key == (pki / "tfserving.key").read_text()
    assert config.server_cert == (pki / "tfserving.crt").read_text()
    assert config.custom_ca == ((pki / "ca.crt").read_text() if with_ca else "")
    assert config.client_verify is with_ca
    assert oct(out.stat().st_mode & 0o777) == "0o400"


def test_mutual_tls_handshake_with_such_certificates(pki: Path) -> None:
    """A gRPC server with the TF Serving certificate that requires client certificates of the CA
    (what --ssl_config_file with client_verify does), and a client with the scoring certificate
    dialing the Service name: the call goes through; without a client certificate it does not."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    def read(name: str) -> bytes:
        return (pki / name).read_bytes()

    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [(read("tfserving.key"), read("tfserving.crt"))],
        root_certificates=read("ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    options = [("grpc.ssl_target_name_override", "prolifscore-tfserving")]
    try:
        client = grpc.ssl_channel_credentials(
            read("ca.crt"), read("scoring.key"), read("scoring.crt")
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", client, options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        anonymous = grpc.ssl_channel_credentials(read("ca.crt"))
        with (
            grpc.secure_channel(f"127.0.0.1:{port}", anonymous, options) as channel,
            pytest.raises(grpc.RpcError),
        ):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        server.stop(None)


def test_no_tls_files_without_the_component(render: Render) -> None:
    if "grpc-tls" in render.features:
        return
    for pod in pod_specs(render):
        for v in pod.spec.get("volumes", []):
            assert v["name"] not in ("grpc-tls", "ssl-config"), pod.where
