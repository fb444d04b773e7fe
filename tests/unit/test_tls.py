"""gRPC mutual TLS from the PROLIF_TLS_* settings, with throwaway certificates: a server with a CA
refuses clients without a certificate, with one from another CA and in plaintext (the client sees
UNAVAILABLE); the right client gets through; scoring calls the model server over mutual TLS; the
CLI and `prolifscore status` dial with the same settings."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prolifscore.cli.main import main
from prolifscore.core.runtime.service import ServiceRuntime
from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.runtime.tls import (
    TLSConfigError,
    channel_credentials,
    open_channel,
    server_credentials,
)
from tests.certs import PKI, Identity, make_pki
from tests.slides import CMU, SLIDES

TLS_VARS = ("PROLIF_TLS_CERT_FILE", "PROLIF_TLS_KEY_FILE", "PROLIF_TLS_CA_FILE")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_tls_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in TLS_VARS:
        monkeypatch.delenv(var, raising=False)


def tls(
    identity: Identity | None = None, ca: Path | None = None, **extra: object
) -> RuntimeSettings:
    """Runtime settings with these TLS files (nothing else from the environment)."""
    return load(
        RuntimeSettings,
        environ={},
        tls_cert_file=str(identity.cert) if identity else "",
        tls_key_file=str(identity.key) if identity else "",
        tls_ca_file=str(ca or ""),
        **extra,
    )


@contextlib.contextmanager
def serving(runtime: RuntimeSettings) -> Iterator[ServiceRuntime]:
    """A service runtime (health only) on those settings, SERVING."""
    rt = ServiceRuntime("probe", runtime)
    rt.start()
    rt.set_serving(True)
    try:
        yield rt
    finally:
        rt.stop()


@pytest.fixture
def mutual(pki: PKI) -> Iterator[ServiceRuntime]:
    """A service whose server requires client certificates of the CA."""
    with serving(tls(pki.server, pki.ca)) as rt:
        yield rt


def health(port: int, files: RuntimeSettings | None) -> str:
    """SERVING, or the status code the call failed with."""
    with open_channel(f"localhost:{port}", files) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(mutual, pki):
    assert health(mutual.port, tls(pki.client, pki.ca)) == "SERVING"
    refused = {
        "no client certificate": tls(None, pki.ca),
        "certificate of another CA": tls(pki.stranger, pki.ca),
        "plaintext": None,
        "server not trusted": tls(pki.client, pki.other_ca),
    }
    for why, files in refused.items():
        assert health(mutual.port, files) == "UNAVAILABLE", why


def test_tls_without_a_ca_serves_any_tls_client(pki):
    with serving(tls(pki.server)) as rt:  # one-way TLS: no client certificate asked for
        assert health(rt.port, tls(None, pki.ca)) == "SERVING"
        assert health(rt.port, None) == "UNAVAILABLE"


def test_settings_that_cannot_work_fail_at_start_naming_the_variable(pki, tmp_path):
    with pytest.raises(TLSConfigError, match="PROLIF_TLS_CA_FILE is set but"):
        server_credentials(tls(None, pki.ca))
    half = load(RuntimeSettings, environ={}, tls_cert_file=str(pki.server.cert))
    with pytest.raises(TLSConfigError, match="must be set together"):
        server_credentials(half)
    missing = tls(Identity(tmp_path / "nope.crt", pki.server.key), pki.ca)
    with pytest.raises(TLSConfigError, match=r"PROLIF_TLS_CERT_FILE=.*nope\.crt"):
        server_credentials(missing)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        channel_credentials(tls(None, tmp_path / "junk.pem"))
    assert channel_credentials(tls(pki.client)) is None  # no CA: outgoing calls stay plaintext
    assert server_credentials(tls()) is None


# -- the hops: scoring -> model server, CLI -> scoring, status -> services ---------------------


@pytest.fixture(scope="module")
def model_server(pki, exported_root):
    """The local model server over mutual TLS with untrained test models (the session's)."""
    pytest.importorskip("tensorflow")
    from prolifscore.modelserver.config import ModelServerSettings
    from prolifscore.modelserver.server import ModelServer

    settings = load(
        ModelServerSettings,
        environ={},
        model_root=exported_root,
        port=0,
        runtime=tls(pki.server, pki.ca),
    )
    server = ModelServer(settings).start()
    yield server
    server.stop()


def scoring(pki: PKI, identity: Identity, model_port: int, results: Path) -> ServiceRuntime:
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.scoring.server import build

    settings = load(
        ScoringSettings,
        environ={},
        runtime=tls(identity, pki.ca, slide_roots=(SLIDES,), results_root=results),
        port=0,
        ray_readers=0,
        kafka_enabled=False,
        model_server=f"localhost:{model_port}",
        model_retries=1,
    )
    rt, _ = build(settings)
    rt.start()
    rt.set_serving(True)
    return rt


def test_scoring_calls_the_model_server_over_mutual_tls(pki, model_server, tmp_path):
    from prolifscore.v1 import scoring_pb2 as spb
    from prolifscore.v1 import scoring_pb2_grpc

    request = spb.ScoreRequest(path=str(CMU))
    good = scoring(pki, pki.server, model_server.port, tmp_path)
    # scoring's own certificate is of another CA: the model server refuses its calls (the test
    # client trusts that CA to reach this scoring server at all)
    stranger = scoring(pki, pki.stranger, model_server.port, tmp_path)
    try:
        with open_channel(f"localhost:{good.port}", tls(pki.client, pki.ca)) as channel:
            result = scoring_pb2_grpc.ScoringServiceStub(channel).ScoreSlide(request, timeout=120)
        assert result.tiles_scored > 0 and {m.name for m in result.models} == {
            "resnet50",
            "mitosis",
        }
        with (
            open_channel(f"localhost:{stranger.port}", tls(pki.client, pki.other_ca)) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            scoring_pb2_grpc.ScoringServiceStub(channel).ScoreSlide(request, timeout=120)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"localhost:{model_server.port}" in err.value.details()
    finally:
        good.stop()
        stranger.stop()


def test_score_cli_dials_with_the_tls_flags(pki, model_server, capsys, tmp_path):
    rt = scoring(pki, pki.server, model_server.port, tmp_path)
    argv = ["score", str(CMU), "--server", f"localhost:{rt.port}", "--json"]
    ca = ["--tls-ca", str(pki.ca)]
    cert = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    try:
        assert main([*argv, *ca, *cert]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["tilesScored"] > 0
        assert main([*argv, *ca, "--timeout", "20"]) == 1  # no client certificate
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert main([*argv, *cert]) == 2  # a certificate without a CA to verify the server
        assert "need --tls-ca" in capsys.readouterr().err
    finally:
        rt.stop()


def test_status_checks_health_with_the_environments_certificate(
    pki, mutual, tmp_path, monkeypatch, capsys
):
    state = {"pid": 1, "broker": "-", "ray": "-", "services": {"probe": f"localhost:{mutual.port}"}}
    (tmp_path / "stack.json").write_text(json.dumps(state))
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert "unreachable (UNAVAILABLE)" in capsys.readouterr().out  # plaintext is refused
    for var, value in pki.client.env(pki.ca).items():
        monkeypatch.setenv(var, value)
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert f"localhost:{mutual.port}" in (out := capsys.readouterr().out) and "SERVING" in out
