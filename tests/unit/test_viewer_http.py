"""The viewer's HTTP service on a free port: pages, JSON API, DeepZoom tiles, downloads, health
and metrics, and path attacks on every kind of URL (refused with 4xx, nothing outside the roots
ever served)."""

from __future__ import annotations

import csv
import http.client
import io
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from prolifscore.core.results import ResultStore
from prolifscore.core.runtime.settings import load
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.viewer.config import ViewerSettings
from prolifscore.viewer.server import OSD_BUILD, serve
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")
SECRET = b"TOP-SECRET-NOT-A-SLIDE"


def synthetic_result() -> spb.SlideScore:
    s = spb.SlideScore(
        request_id="req-1",
        slide_id=CMU.stem,
        tumor_score=3,
        probabilities=[0.1, 0.2, 0.7],
        mitosis_count=2,
        mitoses_per_10hpf=2,
        mitotic_score=1,
        tiles_total=4,
        tiles_scored=4,
        models=[spb.ModelVersion(name="resnet50", version=2)],
        warnings=[
            "model resnet50 v2 is untrained (random initialisation): this is not a real score"
        ],
    )
    for row in range(2):
        for col in range(2):
            s.tiles.add(
                col=col + 2, row=row + 3, x=(col + 2) * 256, y=(row + 3) * 256,
                probabilities=[0.1, 0.2, 0.7], mitosis_max=0.9, mitoses=1,
            )  # fmt: skip
    s.mitoses.add(x=600, y=850, probability=0.91)
    s.mitoses.add(x=900, y=1100, probability=0.62)
    return s


class Served(NamedTuple):
    url: str
    grpc: str
    metrics: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("viewer")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.svs").write_bytes(SECRET)
    root = tmp / "root"
    (root / "sub").mkdir(parents=True)
    (root / "escape.svs").symlink_to(outside / "secret.svs")  # a symlink out of the roots
    (root / "sub" / "inner.svs").symlink_to(CMU)  # a symlink into another root: allowed
    (root / "notes.svs").write_bytes(b"not a slide")
    results = tmp / "results"
    s = synthetic_result()
    s.heatmap_png = b"\x89PNG\r\n\x1a\nfake"
    ResultStore(results).save(s)
    base = load(ViewerSettings, environ={})
    settings = replace(
        base,
        runtime=replace(
            base.runtime,
            slide_roots=(SLIDES, root),
            results_root=results,
            grpc_port=0,
            metrics_port=0,
        ),
        port=0,
    )
    runtime, service = serve(settings)
    try:
        yield Served(
            service.url.rstrip("/"),
            f"127.0.0.1:{runtime.port}",
            f"http://127.0.0.1:{runtime.metrics_port}/metrics",
        )
    finally:
        service.stop()
        runtime.stop()


@pytest.fixture
def viewer(served: Served) -> str:
    return served.url


def raw_get(base: str, target: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """The request target sent exactly as written (no client-side normalisation)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(base: str, target: str) -> dict:
    status, _, body = raw_get(base, target)
    assert status == 200, (target, status, body[:300])
    return json.loads(body)


def test_slide_list_shows_latest_results(viewer: str) -> None:
    data = get_json(viewer, "/api/slides")
    by_name = {s["name"]: s for s in data["slides"]}
    assert {CMU.name, "kidney-48-5.tif", "sub/inner.svs"} <= set(by_name)
    assert "escape.svs" not in by_name  # its symlink leaves the roots
    r = by_name[CMU.name]["result"]
    assert r["tumor_score"] == 3 and r["probabilities"] == [0.1, 0.2, 0.7]
    assert r["mitosis_count"] == 2 and r["models"] == [{"name": "resnet50", "version": 2}]
    assert "untrained" in r["warnings"][0] and r["has_heatmap"]
    assert by_name["kidney-48-5.tif"]["result"] is None
    status, headers, page = raw_get(viewer, "/")
    assert status == 200 and b"/static/list.js" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]  # no CDN can load


def test_slide_api_overlays_and_tiles(viewer: str) -> None:
    info = get_json(viewer, f"/api/slide/{CMU.name}")
    assert info["dimensions"] == [2220, 2967] and info["slide_id"] == CMU.stem
    assert info["history"] == ["req-1"] and info["result"]["tumor_score"] == 3
    overlays = get_json(viewer, info["overlays"])
    assert overlays["tile_side"] == 256  # read off the tile grid (x = col * 256)
    assert overlays["tiles"][0] == [512, 768, 0.1, 0.2, 0.7, 0.9, 1]
    assert overlays["mitoses"] == [[600, 850, 0.91], [900, 1100, 0.62]]
    region = overlays["region"]  # not in the result: computed from the mitoses, and said so
    assert region["computed"] and region["x"] <= 600 and region["y"] <= 850
    status, headers, dzi = raw_get(viewer, info["dzi"])
    assert status == 200 and b'Width="2220" Height="2967"' in dzi and b'TileSize="256"' in dzi
    status, headers, jpeg = raw_get(viewer, f"/dzi/{CMU.name}_files/12/8_11.jpeg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg)).size == (2220 - 8 * 256, 2967 - 11 * 256)
    again = raw_get(viewer, f"/dzi/{CMU.name}_files/12/8_11.jpeg")[2]
    assert again == jpeg  # from the tile cache
    assert raw_get(viewer, f"/dzi/{CMU.name}_files/12/9_0.jpeg")[0] == 404
    assert raw_get(viewer, f"/dzi/{CMU.name}_files/13/0_0.jpeg")[0] == 404
    status, _, page = raw_get(viewer, f"/slide/{CMU.name}")
    assert status == 200 and b"/vendor/openseadragon/openseadragon.min.js" in page
    inner = get_json(viewer, "/api/slide/sub/inner.svs")  # through an allowed symlink
    assert inner["dimensions"] == [2220, 2967] and inner["result"] is None


def test_results_api_and_downloads(viewer: str) -> None:
    assert get_json(viewer, "/api/results")[CMU.stem]["tumor_score"] == 3
    full = get_json(viewer, f"/api/results/{CMU.stem}")
    assert full["requestId"] == "req-1" and len(full["tiles"]) == 4
    assert raw_get(viewer, f"/api/results/{CMU.stem}?request=nope")[0] == 404
    status, headers, body = raw_get(viewer, f"/export/{CMU.name}.geojson")
    assert status == 200 and headers["Content-Type"] == "application/geo+json"
    assert 'filename="cmu-1-small-region.geojson"' in headers["Content-Disposition"]
    features = json.loads(body)["features"]
    kinds = sorted(f["properties"]["objectType"] for f in features)
    assert kinds == ["detection"] * 2 + ["tile"] * 4
    status, _, body = raw_get(viewer, "/export/predictions.csv")
    assert status == 200
    assert list(csv.reader(io.StringIO(body.decode()))) == [
        ["slide_id", "tumor_score"],
        [CMU.stem, "3"],
    ]
    status, headers, png = raw_get(viewer, f"/heatmap/{CMU.name}.png")
    assert status == 200 and png.startswith(b"\x89PNG") and headers["Content-Type"] == "image/png"
    assert raw_get(viewer, "/heatmap/kidney-48-5.tif.png")[0] == 404
    status, headers, body = raw_get(viewer, f"/api/slide/{CMU.name}", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_static_and_vendor_files(viewer: str) -> None:
    status, headers, js = raw_get(viewer, "/static/slide.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript" and b"OpenSeadragon" in js
    if not OSD_BUILD.is_dir():
        pytest.fail("OpenSeadragon is not installed: run `make setup` (npm ci)")
    status, _, osd = raw_get(viewer, "/vendor/openseadragon/openseadragon.min.js")
    assert status == 200 and b"OpenSeadragon" in osd
    status, headers, _ = raw_get(viewer, "/vendor/openseadragon/images/home_rest.png")
    assert status == 200 and headers["Content-Type"] == "image/png"


def test_health_and_metrics(served: Served) -> None:
    viewer = served.url
    with grpc.insecure_channel(served.grpc) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="viewer"), timeout=5
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    raw_get(viewer, f"/dzi/{CMU.name}_files/10/0_0.jpeg")
    text = urllib.request.urlopen(served.metrics, timeout=5).read().decode()
    assert 'prolif_tiles_total{kind="served",service="viewer"}' in text
    assert raw_get(viewer, "/healthz")[2] == b"ok\n"


ATTACKS = [
    "/slide/../outside/secret.svs",
    "/slide/%2e%2e/outside/secret.svs",
    "/slide/%2E%2E%2Foutside%2Fsecret.svs",
    "/slide/..%2f..%2f..%2fetc%2fpasswd",
    "/slide//etc/passwd",
    "/slide/%2Fetc%2Fpasswd",
    "/slide/escape.svs",
    "/slide/cmu-1-small-region.svs%00.txt",
    "/slide/cmu-1-small-region.svs\\..\\..\\x",
    "/slide/./cmu-1-small-region.svs",
    "/api/slide/../outside/secret.svs",
    "/api/slide/escape.svs",
    "/api/overlays/%2e%2e%2foutside%2fsecret.svs",
    "/api/overlays/%252e%252e/outside/secret.svs",
    "/api/results/..%2f..%2foutside%2fsecret",
    "/dzi/escape.svs.dzi",
    "/dzi/..%2foutside%2fsecret.svs.dzi",
    "/dzi/%2Fetc%2Fpasswd.dzi",
    "/dzi/escape.svs_files/0/0_0.jpeg",
    "/dzi/%2e%2e/outside/secret.svs_files/0/0_0.jpeg",
    "/dzi/cmu-1-small-region.svs_files/99999/0_0.jpeg",
    "/export/..%2Foutside%2Fsecret.svs.geojson",
    "/export/escape.svs.geojson",
    "/heatmap/../outside/secret.svs.png",
    "/static/../server.py",
    "/static/..%2Fserver.py",
    "/static/%2e%2e%2fconfig.py",
    "/vendor/openseadragon/../../package.json",
    "/vendor/openseadragon/..%2F..%2F..%2Fpackage.json",
    "/vendor/openseadragon/%2Fetc%2Fpasswd",
    "/nowhere",
]


@pytest.mark.parametrize("target", ATTACKS)
def test_path_attacks_are_refused(viewer: str, target: str) -> None:
    status, _, body = raw_get(viewer, target)
    assert 400 <= status < 500, (target, status)
    assert SECRET not in body and b"root:" not in body
    assert json.loads(body)["error"]


def test_refusals_say_why(viewer: str) -> None:
    assert raw_get(viewer, "/slide/escape.svs")[0] == 403  # symlink out of the roots
    assert raw_get(viewer, "/slide/%2e%2e/outside/secret.svs")[0] == 400  # not a plain name
    assert raw_get(viewer, "/slide/missing.svs")[0] == 404
    assert raw_get(viewer, "/api/slide/notes.svs")[0] == 422  # there, but not a slide
    assert raw_get(viewer, "/slide/x%00")[0] == 400


def test_relative_slide_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROLIF_SLIDE_ROOTS defaults to a relative folder: names resolve against it."""
    from prolifscore.viewer import slides as sl

    monkeypatch.chdir(SLIDES.parent)
    roots = [Path(SLIDES.name)]
    assert sl.resolve(CMU.name, roots) == CMU.resolve()
    assert CMU.name in [f.name for f in sl.list_slides(roots)]
    with pytest.raises(sl.BadSlideName):
        sl.resolve("../slides/" + CMU.name, roots)
