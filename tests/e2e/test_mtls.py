"""Mutual TLS between real processes: the model server and the scoring service started by the
embedded runtime's supervisor with PROLIF_TLS_* (its health checks dial with the same
certificates), scoring calling the model server over mutual TLS, and the clients users run
(`prolifscore score` with flags or the environment, `prolifscore status`) getting through only
with a certificate of the CA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.runtime.tls import open_channel
from prolifscore.localstack.stack import ServiceProcess
from tests.certs import PKI, make_pki
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.slow
TLS_VARS = ("PROLIF_TLS_CERT_FILE", "PROLIF_TLS_KEY_FILE", "PROLIF_TLS_CA_FILE")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def services(pki, exported_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mtls")
    root = exported_root  # the session's untrained models (read only)
    tls = pki.server.env(pki.ca)
    models = ServiceProcess(
        "prolifscore.modelserver.server",
        {**tls, "PROLIF_MODEL_ROOT": str(root)},
        tmp / "modelserver.log",
        port_env="PROLIF_MODEL_SERVER_PORT",
    ).start(timeout=120)  # returns once a health check over mutual TLS says SERVING
    scoring = ServiceProcess(
        "prolifscore.scoring.server",
        {
            **tls,
            "PROLIF_SLIDE_ROOTS": str(SLIDES),
            "PROLIF_MODEL_SERVER": models.grpc_address,
            "PROLIF_SCORING_KAFKA": "0",
            "PROLIF_SCORING_RAY_READERS": "0",
            "PROLIF_RESULTS_ROOT": str(tmp / "results"),
        },
        tmp / "scoring.log",
        port_env="PROLIF_SCORING_PORT",
    ).start(timeout=120)
    yield {"models": models, "scoring": scoring, "tmp": tmp}
    for proc in (scoring, models):
        assert proc.stop() == 0, proc.tail()


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in TLS_VARS}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prolifscore.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_health_checks_need_a_certificate_of_the_ca(services, pki):
    with_cert = load(RuntimeSettings, environ=pki.client.env(pki.ca))
    no_cert = load(RuntimeSettings, environ={"PROLIF_TLS_CA_FILE": str(pki.ca)})
    for proc in (services["models"], services["scoring"]):
        for files, expected in ((with_cert, None), (no_cert, "UNAVAILABLE"), (None, "UNAVAILABLE")):
            with open_channel(proc.grpc_address, files) as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                    got = None
                except grpc.RpcError as exc:
                    got = exc.code().name  # type: ignore[attr-defined]
            assert got == expected, (proc.module, files)


def test_score_cli_over_mutual_tls_end_to_end(services, pki):
    """CLI -> scoring -> model server, every hop mutual TLS."""
    address = services["scoring"].grpc_address
    flags = [
        *("--tls-ca", str(pki.ca)),
        *("--tls-cert", str(pki.client.cert)),
        *("--tls-key", str(pki.client.key)),
    ]
    out = cli("score", str(CMU), "--server", address, "--json", *flags, env=plain_env())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tilesScored"] > 0 and {m["name"] for m in result["models"]} == {
        "resnet50",
        "mitosis",
    }
    # the same settings from the environment, as a service host has them
    env = {**plain_env(), **pki.client.env(pki.ca)}
    again = cli("score", str(CMU), "--server", address, "--json", env=env)
    assert again.returncode == 0, again.stderr
    anonymous = cli(
        "score", str(CMU), "--server", address, "--tls-ca", str(pki.ca), "--timeout", "20",
        env=plain_env(),
    )  # fmt: skip
    assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr


def test_status_with_and_without_the_certificate(services, pki, tmp_path: Path):
    state = {
        "pid": os.getpid(),
        "broker": "-",
        "ray": "-",
        "services": {n: services[n].grpc_address for n in ("models", "scoring")},
    }
    (tmp_path / "stack.json").write_text(json.dumps(state))
    env = {**plain_env(), **pki.client.env(pki.ca)}
    ok = cli("status", "--run-dir", str(tmp_path), env=env)
    rows = {line.split()[0]: line for line in ok.stdout.splitlines() if line.strip()}
    assert ok.returncode == 0, ok.stdout
    assert all(rows[n].rstrip().endswith("SERVING") for n in ("models", "scoring")), ok.stdout
    refused = cli("status", "--run-dir", str(tmp_path), env=plain_env())
    assert refused.stdout.count("unreachable (UNAVAILABLE)") == 2, refused.stdout
