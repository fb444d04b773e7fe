"""Viewer service: slides at full resolution with what the model saw over them, in a browser.

HTTP (standard library ThreadingHTTPServer) serves the pages, a JSON API, DeepZoom tiles and the
downloads; gRPC health and Prometheus metrics come from ServiceRuntime like every service's.
Everything is read from disk (slide roots, results root), so it works with the stack stopped.
Entry point: `prolifscore-viewer` (python -m prolifscore.viewer.server); `prolifscore view`.

Routes (GET and HEAD; NAME = a slide's path relative to its slide root):
  /                          slide list with the latest results
  /slide/NAME                the slide page (OpenSeadragon + overlays)
  /api/slides                slides and their latest result summaries
  /api/slide/NAME            one slide: size, levels, results history, latest summary
  /api/overlays/NAME         tiles, mitoses, densest region of the latest (or ?request=) result
  /api/results               latest result summary per slide id
  /api/results/SLIDE_ID      a whole stored result (SlideScore JSON; ?request= picks one)
  /dzi/NAME.dzi              DeepZoom descriptor; /dzi/NAME_files/L/C_R.jpeg its tiles
  /export/NAME.geojson       QuPath GeoJSON of the latest (or ?request=) result
  /export/predictions.csv    slide_id,tumor_score of every slide (prolifscore evaluate's input)
  /heatmap/NAME.png          the heatmap PNG stored with the result
  /static/FILE, /vendor/openseadragon/FILE   the page's own files and the npm-installed ones
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from google.protobuf import json_format

from prolifscore.core.results import (
    ResultStore,
    StoredResult,
    predictions_csv,
    safe_id,
    to_geojson,
)
from prolifscore.core.runtime import metrics
from prolifscore.core.runtime.logs import setup_logging
from prolifscore.core.runtime.service import ServiceRuntime
from prolifscore.core.runtime.settings import load
from prolifscore.core.wsi.slide import SlideError, SlideNotFound, SlidePathDenied
from prolifscore.viewer import slides as sl
from prolifscore.viewer.config import ViewerSettings
from prolifscore.viewer.deepzoom import DeepZoom, OpenSlides, TileCache, TileNotFound

log = logging.getLogger(__name__)
NAME = "viewer"
WEB = Path(__file__).resolve().parent / "web"
OSD_BUILD = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
STATIC = {"app.css": "text/css", "list.js": "text/javascript", "slide.js": "text/javascript"}
TYPES = {".js": "text/javascript", ".png": "image/png", ".map": "application/json"}
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
TILE_URL = re.compile(r"/dzi/(.+)_files/(\d{1,3})/(\d{1,7})_(\d{1,7})\.jpe?g")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), "application/json")


def _download(body: str, content_type: str, filename: str) -> Response:
    disposition = f'attachment; filename="{filename}"'
    return Response(200, body.encode(), content_type, {"Content-Disposition": disposition})


def _status_for(exc: SlideError) -> int:
    if isinstance(exc, SlidePathDenied):
        return 403
    if isinstance(exc, SlideNotFound):
        return 404
    return 422  # there, but not a slide either reader can open


def vendor_files(root: Path) -> dict[str, Path]:
    """The installed OpenSeadragon files by relative name: URLs are looked up, never joined."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix in TYPES
    }


class Viewer:
    """The application behind the HTTP server: routes a decoded path to a Response."""

    def __init__(self, settings: ViewerSettings) -> None:
        self.settings = settings
        self.roots = [Path(r) for r in settings.runtime.slide_roots]
        self.store = ResultStore(settings.runtime.results_root)
        self.slides = OpenSlides(settings.open_slides, settings.tile_size, settings.jpeg_quality)
        self.tiles = TileCache(settings.tile_cache_mb * 2**20)
        self.vendor = vendor_files(OSD_BUILD)
        if not self.vendor:
            log.warning("OpenSeadragon is not installed (make setup runs npm ci in %s)", WEB)
        exact: dict[str, Callable[[dict], Response]] = {
            "/": lambda q: self._page("index.html"),
            "/healthz": lambda q: Response(200, b"ok\n", "text/plain"),
            "/api/slides": self._api_slides,
            "/api/results": self._api_results,
            "/export/predictions.csv": self._export_csv,
        }
        self.exact = exact
        self.prefixed: list[tuple[str, str, Callable[[str, dict], Response]]] = [
            ("/slide/", "", self._slide_page),
            ("/api/slide/", "", self._api_slide),
            ("/api/overlays/", "", self._api_overlays),
            ("/api/results/", "", self._api_result),
            ("/dzi/", ".dzi", self._dzi),
            ("/export/", ".geojson", self._export_geojson),
            ("/heatmap/", ".png", self._heatmap),
            ("/static/", "", self._static),
            ("/vendor/openseadragon/", "", self._vendor),
        ]

    # -- routing ---------------------------------------------------------------------------

    def handle(self, raw_target: str) -> Response:
        """`raw_target` as sent (percent-encoded). Decoded once, then matched: a name never
        reaches the file system without `slides.resolve`'s checks."""
        parts = urlsplit(raw_target)
        if "%00" in parts.path.lower() or "\x00" in parts.path:
            raise HttpError(400, "NUL in path")
        try:
            path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError as exc:
            raise HttpError(400, "path is not UTF-8") from exc
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if path in self.exact:
            return self.exact[path](query)
        tile = TILE_URL.fullmatch(path)
        if tile:
            name, level, col, row = tile.groups()
            return self._tile(name, int(level), int(col), int(row))
        for prefix, suffix, fn in self.prefixed:
            if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix):
                rest = (
                    path[len(prefix) : len(path) - len(suffix)] if suffix else path[len(prefix) :]
                )
                return fn(rest, query)
        raise HttpError(404, "no such page")

    def _resolve(self, name: str) -> Path:
        try:
            return sl.resolve(name, self.roots)
        except sl.BadSlideName as exc:
            raise HttpError(400, str(exc)) from exc
        except SlideError as exc:
            raise HttpError(_status_for(exc), str(exc)) from exc

    @contextmanager
    def _deepzoom(self, path: Path) -> Iterator[DeepZoom]:
        try:
            with self.slides.deepzoom(path) as dz:
                yield dz
        except SlideError as exc:
            raise HttpError(_status_for(exc), str(exc)) from exc

    def _result(self, slide_id: str, query: dict) -> StoredResult | None:
        if "request" in query:
            found = self.store.get(slide_id, query["request"])
            if found is None:
                raise HttpError(404, "no such result")
            return found
        return self.store.latest(slide_id)

    def _slide_result(self, name: str, query: dict) -> tuple[Path, StoredResult]:
        """The slide file a name means and its latest (or ?request=) result; 404 without one."""
        path = self._resolve(name)
        result = self._result(Path(name).stem, query)
        if result is None:
            raise HttpError(404, "no result for this slide")
        return path, result

    # -- pages and files ---------------------------------------------------------------------

    def _page(self, name: str) -> Response:
        return Response(200, (WEB / name).read_bytes(), "text/html; charset=utf-8")

    def _slide_page(self, name: str, _q: dict) -> Response:
        self._resolve(name)
        return self._page("slide.html")

    def _static(self, name: str, _q: dict) -> Response:
        if name not in STATIC:
            raise HttpError(404, "no such file")
        return Response(200, (WEB / name).read_bytes(), STATIC[name])

    def _vendor(self, name: str, _q: dict) -> Response:
        path = self.vendor.get(name)
        if path is None:
            raise HttpError(404, "no such file (is OpenSeadragon installed? make setup)")
        cache = {"Cache-Control": "public, max-age=86400"}
        return Response(200, path.read_bytes(), TYPES[path.suffix], cache)

    # -- API ----------------------------------------------------------------------------------

    def _api_slides(self, _q: dict) -> Response:
        latest = self.store.latest_by_slide()
        out, shown = [], set()
        for f in sl.list_slides(self.roots):
            result = latest.get(f.slide_id)
            shown.add(f.slide_id)
            out.append(
                {
                    "name": f.name,
                    "slide_id": f.slide_id,
                    "url": "/slide/" + quote(f.name),
                    "result": sl.summary(result) if result else None,
                }
            )
        orphans = [
            {"slide_id": sid, "result": sl.summary(r)}
            for sid, r in sorted(latest.items())
            if sid not in shown
        ]
        return _json({"slides": out, "results_without_slide": orphans})

    def _api_results(self, _q: dict) -> Response:
        latest = self.store.latest_by_slide()
        return _json({sid: sl.summary(r) for sid, r in sorted(latest.items())})

    def _api_result(self, slide_id: str, query: dict) -> Response:
        result = self._result(slide_id, query)
        if result is None:
            raise HttpError(404, "no result for this slide")
        return _json(json_format.MessageToDict(result.score))

    def _api_slide(self, name: str, query: dict) -> Response:
        path = self._resolve(name)
        slide_id = Path(name).stem
        result = self._result(slide_id, query)
        with self._deepzoom(path) as dz:
            s = dz.slide
            info = {
                "dimensions": list(s.dimensions),
                "mpp": s.base_mpp(),
                "levels": [list(d) for d in s.level_dimensions],
                "backend": s.backend,
                "deepzoom_levels": dz.level_count,
            }
        q = quote(name)
        request = f"?request={quote(result.request_id)}" if result else ""
        return _json(
            {
                "name": name,
                "slide_id": slide_id,
                **info,
                "dzi": f"/dzi/{q}.dzi",
                "result": sl.summary(result) if result else None,
                "history": [r.request_id for r in self.store.history(slide_id)],
                "overlays": f"/api/overlays/{q}{request}" if result else None,
                "downloads": {
                    "geojson": f"/export/{q}.geojson{request}" if result else None,
                    "csv": "/export/predictions.csv",
                    "heatmap": f"/heatmap/{q}.png{request}" if result and result.heatmap else None,
                },
            }
        )

    def _api_overlays(self, name: str, query: dict) -> Response:
        path, result = self._slide_result(name, query)
        with self._deepzoom(path) as dz:
            return _json(sl.overlays(result, dz.slide, self.settings.preprocess))

    # -- tiles --------------------------------------------------------------------------------

    def _dzi(self, name: str, _q: dict) -> Response:
        path = self._resolve(name)
        with self._deepzoom(path) as dz:
            return Response(200, dz.dzi().encode(), "application/xml")

    def _tile(self, name: str, level: int, col: int, row: int) -> Response:
        path = self._resolve(name)
        key = (str(path), level, col, row)
        headers = {"Cache-Control": "public, max-age=300"}
        data = self.tiles.get(key)
        if data is not None:
            metrics.TILES.labels(NAME, "cached").inc()
            return Response(200, data, "image/jpeg", headers)
        with metrics.DURATION.labels(NAME, "tile").time(), self._deepzoom(path) as dz:
            try:
                data = dz.tile_jpeg(level, col, row)
            except TileNotFound as exc:
                raise HttpError(404, str(exc)) from exc
        self.tiles.put(key, data)
        metrics.TILES.labels(NAME, "served").inc()
        return Response(200, data, "image/jpeg", headers)

    # -- downloads ----------------------------------------------------------------------------

    def _export_geojson(self, name: str, query: dict) -> Response:
        path, result = self._slide_result(name, query)
        with self._deepzoom(path) as dz:
            side = sl.tile_side0(result, dz.slide, self.settings.preprocess)
        body = json.dumps(to_geojson(result.score, side))
        filename = f"{safe_id(result.score.slide_id)}.geojson"
        return _download(body, "application/geo+json", filename)

    def _export_csv(self, _q: dict) -> Response:
        latest = self.store.latest_by_slide()
        body = predictions_csv(r.score for _, r in sorted(latest.items()))
        return _download(body, "text/csv; charset=utf-8", "predictions.csv")

    def _heatmap(self, name: str, query: dict) -> Response:
        _, result = self._slide_result(name, query)
        if result.heatmap is None:
            raise HttpError(404, "no heatmap for this slide")
        return Response(200, result.heatmap.read_bytes(), "image/png")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: OpenSeadragon fetches many tiles per view
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        try:
            response = self.server.viewer.handle(self.path)
        except HttpError as exc:
            metrics.FAILURES.labels(NAME, f"http_{exc.status}").inc()
            response = _json({"error": str(exc)}, exc.status)
        except Exception:
            log.exception("request failed", extra={"path": self.path[:200]})
            metrics.FAILURES.labels(NAME, "http_500").inc()
            response = _json({"error": "internal error"}, 500)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a viewer opens several tile connections at once
    viewer: Viewer


class ViewerService:
    """The HTTP server on its own thread, beside the runtime's gRPC health server."""

    def __init__(self, settings: ViewerSettings) -> None:
        self.viewer = Viewer(settings)
        self.httpd = _Server((settings.runtime.bind_host, settings.port), _Handler)
        self.httpd.viewer = self.viewer
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="http")

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> ViewerService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.viewer.slides.close()


def build(settings: ViewerSettings) -> tuple[ServiceRuntime, ViewerService]:
    """Runtime (health, metrics) and HTTP server, not started: shared by main(), `prolifscore
    view` and tests."""
    runtime = ServiceRuntime(NAME, settings.runtime)
    return runtime, ViewerService(settings)


def serve(settings: ViewerSettings) -> tuple[ServiceRuntime, ViewerService]:
    """Start both; SERVING once the HTTP server accepts connections."""
    runtime, service = build(settings)
    runtime.start()
    service.start()
    runtime.set_serving(True)
    log.info("viewer serving", extra={"url": service.url})
    return runtime, service


def main() -> None:
    settings = load(ViewerSettings)
    setup_logging(NAME, settings.runtime.log_level)
    runtime, service = serve(settings)
    runtime.handle_signals()
    started = time.monotonic()
    try:
        runtime.stopping.wait()
    finally:
        service.stop()
        runtime.stop()
        log.info("viewer stopped", extra={"uptime_s": round(time.monotonic() - started)})


if __name__ == "__main__":
    main()
