"""Prometheus metrics shared by the services (labelled by service, so one registry serves all)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

SLIDES = Counter("prolif_slides_total", "Slides finished by a stage", ["service", "outcome"])
TILES = Counter("prolif_tiles_total", "Tiles handled", ["service", "kind"])
FAILURES = Counter("prolif_failures_total", "Failed work items", ["service", "reason"])
DEAD_LETTERS = Counter(
    "prolif_dead_letters_total", "Records sent to the dead-letter topic", ["service"]
)
RETRIES = Counter(
    "prolif_retries_total",
    "Records redone after their handler raised (cause: transient = broker or dependency "
    "unreachable, not counted as an attempt; error = counted towards PROLIF_MAX_ATTEMPTS)",
    ["service", "cause"],
)
BROKER_UP = Gauge(
    "prolif_broker_up", "1 while the service reaches its Kafka broker, else 0", ["service"]
)
DURATION = Histogram(
    "prolif_work_seconds",
    "Time per unit of work",
    ["service", "unit"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def start_metrics_server(port: int, host: str) -> ThreadingHTTPServer:
    """Prometheus text at /metrics only; any other path is 404, so an HTTP probe that reaches
    this port by mistake (a TF Serving REST status check, say) fails instead of reading 200."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/metrics":
                self.send_error(404)
                return
            body = generate_latest(REGISTRY)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
