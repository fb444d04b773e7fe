"""`prolifscore view`: the slide viewer in the foreground, on 127.0.0.1, until Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from prolifscore.viewer.config import ViewerSettings


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("view", help="browse slides and their results in a web viewer")
    p.add_argument(
        "slide",
        nargs="?",
        type=Path,
        help="a slide file: its page's URL is printed (its folder is the slide root "
        "unless --slides says otherwise)",
    )
    p.add_argument(
        "--slides",
        help="comma-separated slide roots (default: PROLIF_SLIDE_ROOTS, or the SLIDE's folder)",
    )
    p.add_argument(
        "--results",
        type=Path,
        help="results root (default: PROLIF_RESULTS_ROOT); a demo output folder works too",
    )
    p.add_argument(
        "--port", type=int, help="HTTP port (default: PROLIF_VIEWER_PORT or 8088; 0 = any free)"
    )
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> tuple[ViewerSettings, str]:
    """The viewer's settings (environment, then the options) and the path to print."""
    from prolifscore.core.runtime.settings import load
    from prolifscore.viewer.config import ViewerSettings

    settings = load(ViewerSettings)
    roots = tuple(settings.runtime.slide_roots)
    if args.slides:
        roots = tuple(Path(r) for r in args.slides.split(",") if r.strip())
    elif args.slide is not None and "PROLIF_SLIDE_ROOTS" not in os.environ:
        roots = (args.slide.resolve().parent,)
    page = "/"
    if args.slide is not None:
        slide = args.slide.resolve()
        root = next(
            (Path(r).resolve() for r in roots if slide.is_relative_to(Path(r).resolve())), None
        )
        if root is None:
            raise SystemExit(
                f"{args.slide} is under none of the slide roots {[str(r) for r in roots]}"
            )
        page = "/slide/" + quote(slide.relative_to(root).as_posix())
    runtime = dataclasses.replace(settings.runtime, slide_roots=roots)
    if args.results is not None:
        runtime = dataclasses.replace(runtime, results_root=args.results)
    overrides: dict[str, object] = {"runtime": runtime}
    if args.port is not None:
        overrides["port"] = args.port
    return dataclasses.replace(settings, **overrides), page


def run(args: argparse.Namespace) -> int:
    from prolifscore.viewer.server import serve

    settings, page = settings_from(args)
    try:
        runtime, service = serve(settings)
    except OSError as exc:
        print(f"cannot start the viewer: {exc} (--port 0 picks a free port)", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"viewer: {service.url.rstrip('/')}{page}", flush=True)
    print(
        f"slides from {', '.join(str(r) for r in settings.runtime.slide_roots)}; "
        f"results from {settings.runtime.results_root}; Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    try:
        stop.wait()
    finally:
        service.stop()
        runtime.stop()
    return 0
