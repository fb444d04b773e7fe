"""The slide page in a real browser: Debian's Chromium, headless, driven by Playwright (its own
browser download is not used), loads a real slide with a stored result made here (synthetic
tiles and mitoses at known places, no model), waits for the tiles, toggles and fades the
overlays, and checks the screenshot's pixels where the result says things are."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prolifscore.core.results import ResultStore
from prolifscore.core.runtime.settings import load
from prolifscore.core.wsi.slide import open_slide
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.viewer.config import ViewerSettings
from prolifscore.viewer.server import OSD_BUILD, serve
from tests.slides import CMU, SLIDES

pytestmark = pytest.mark.skipif(not CMU.is_file(), reason="shared slides not available")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIDE = 256
HEAT_TILES = [(4, 3), (5, 3), (4, 4), (5, 4)]  # x 1024-1536, y 768-1280: dense tissue
MITOSES = [(1400, 1900, 0.93), (700, 600, 0.71)]
REGION = (200, 300, 800, 600)
READY = """() => {
  const v = window.prolif && window.prolif.viewer;
  if (!v || document.body.dataset.ready !== "1" || !v.world.getItemAt(0)) return false;
  const vp = v.viewport, a = vp.getCenter(true), b = vp.getCenter(false);
  return Math.abs(vp.getZoom(true) - vp.getZoom(false)) < 1e-9
    && Math.abs(a.x - b.x) < 1e-9 && Math.abs(a.y - b.y) < 1e-9
    && v.world.getItemAt(0).getFullyLoaded();
}"""


def stored_result() -> spb.SlideScore:
    s = spb.SlideScore(
        request_id="browser-1", slide_id=CMU.stem, tumor_score=3, probabilities=[0, 0, 1],
        mitosis_count=len(MITOSES), mitoses_per_10hpf=2, mitotic_score=1,
        tiles_total=len(HEAT_TILES), tiles_scored=len(HEAT_TILES),
    )  # fmt: skip
    for col, row in HEAT_TILES:
        s.tiles.add(col=col, row=row, x=col * SIDE, y=row * SIDE, probabilities=[0.0, 0.0, 1.0])
    for x, y, p in MITOSES:
        s.mitoses.add(x=x, y=y, probability=p)
    x, y, w, h = REGION
    s.densest_region.CopyFrom(spb.Region(x=x, y=y, width=w, height=h))
    return s


@pytest.fixture(scope="module")
def viewer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    results = tmp_path_factory.mktemp("results")
    ResultStore(results).save(stored_result())
    base = load(ViewerSettings, environ={})
    settings = replace(
        base,
        runtime=replace(
            base.runtime,
            slide_roots=(SLIDES,),
            results_root=results,
            grpc_port=0,
            metrics_port=0,
        ),
        port=0,
    )
    runtime, service = serve(settings)
    try:
        yield service.url.rstrip("/")
    finally:
        service.stop()
        runtime.stop()


@pytest.fixture(scope="module")
def page(viewer_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "no chromium: `make setup` installs Debian's package (apt-get install chromium)"
        )
    if not OSD_BUILD.is_dir():
        pytest.fail("OpenSeadragon is not installed: `make setup` runs npm ci")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 900},
            device_scale_factor=1,
        )
        try:
            p = context.new_page()
            errors: list[str] = []
            p.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            p.on("request", lambda r: requests.append(r.url))
            p.goto(f"{viewer_url}/slide/{CMU.name}")
            p.wait_for_function(READY, timeout=20_000, polling=100)
            assert errors == []
            assert all(u.startswith(viewer_url) for u in requests), "nothing from outside"
            yield p
        finally:
            context.close()


def shot(page) -> np.ndarray:  # type: ignore[no-untyped-def]
    page.wait_for_function(READY, timeout=10_000, polling=100)
    png = page.locator("#viewer").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def on_screen(page, x: float, y: float) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Where OpenSeadragon shows level-0 pixel (x, y), in the viewer element's pixels."""
    px, py = page.evaluate(
        "([x, y]) => { const p = prolif.viewer.viewport.imageToViewerElementCoordinates("
        "new OpenSeadragon.Point(x, y)); return [p.x, p.y]; }",
        [x, y],
    )
    return round(px), round(py)


def patch(image: np.ndarray, at: tuple[int, int], r: int = 2) -> np.ndarray:
    x, y = at
    return image[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(axis=0)


def toggle(page, layer: str) -> None:  # type: ignore[no-untyped-def]
    page.click(f"#layer-{layer}")


def test_overlays_show_toggle_and_fade(page) -> None:  # type: ignore[no-untyped-def]
    with open_slide(CMU) as slide:  # the precondition: the heatmap tiles lie on tissue
        for col, row in HEAT_TILES:
            assert slide.read(col * SIDE, row * SIDE, 0, SIDE).mean() < 200
    centres = [on_screen(page, (c + 0.5) * SIDE, (r + 0.5) * SIDE) for c, r in HEAT_TILES]
    marks = [on_screen(page, x, y) for x, y, _ in MITOSES]
    assert page.locator(".ramp").is_visible()  # the colour legend beside the map

    everything = shot(page)
    toggle(page, "heatmap")
    no_heat = shot(page)
    for c in centres:
        with_heat, plain = patch(everything, c), patch(no_heat, c)
        assert plain.mean() < 200, "tissue under the tile"
        r, g, b = with_heat
        assert r > g + 60 and r > b + 40, f"P(score 3) = 1 is red on the scale: {with_heat}"
        assert g < 0.75 * plain[1] and b < 0.75 * plain[2], (with_heat, plain)

    for m in marks:  # mitoses: magenta markers exactly there, nowhere else nearby
        r, g, b = patch(no_heat, m, 1)
        assert r > 200 and b > 200 and g < 60, f"marker at {m}: {(r, g, b)}"
        away = patch(no_heat, (m[0] + 25, m[1] + 25), 1)
        assert not (away[0] > 200 and away[2] > 200 and away[1] < 60)
    toggle(page, "mitoses")
    no_marks = shot(page)
    for m in marks:
        r, g, b = patch(no_marks, m, 1)
        assert not (r > 200 and b > 200 and g < 60), f"marker still at {m}: {(r, g, b)}"

    toggle(page, "heatmap")  # back on, then faded up from 0.45 to 0.9
    faded_in = shot(page)
    page.evaluate(
        "() => { const s = document.getElementById('opacity-heatmap'); s.value = '0.9';"
        " s.dispatchEvent(new Event('input')); }"
    )
    strong = shot(page)
    for c in centres:
        assert patch(strong, c)[1] < patch(faded_in, c)[1] - 20  # redder: less green shows
        assert np.abs(patch(faded_in, c) - patch(everything, c)).max() <= 2


def test_clicking_a_tile_shows_its_probabilities(page) -> None:  # type: ignore[no-untyped-def]
    box = page.locator("#viewer").bounding_box()
    x, y = on_screen(page, 4.5 * SIDE, 3.5 * SIDE)
    page.mouse.click(box["x"] + x, box["y"] + y)
    info = page.locator("#tile-info")
    info.get_by_text("P(tumor score 3)").wait_for(timeout=5000)
    text = info.inner_text()
    assert "x 1024, y 768" in text and "1.0000" in text
