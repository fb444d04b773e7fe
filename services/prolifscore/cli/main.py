"""`prolifscore` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is not for CLI users; services
# keep it in their logs. Before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from prolifscore.cli import demo, export, ingest, models, score, train, up, view
from prolifscore.core.runtime import tracing
from prolifscore.core.runtime.settings import TracingSettings, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prolifscore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ingest.add_parser(sub)
    demo.add_parser(sub)
    score.add_parser(sub)
    train.add_parsers(sub)
    up.add_parsers(sub)
    view.add_parser(sub)
    export.add_parser(sub)
    models.add_parser(sub)
    cfg = sub.add_parser("config", help="print every environment variable as a Markdown table")
    cfg.set_defaults(func=print_config)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Traces start here for `ingest` and `score` when PROLIF_TRACING / OTEL_* turn it on.
    tracing.setup("cli", load(TracingSettings))
    return int(args.func(args) or 0)


def all_settings() -> dict[str, type]:
    from prolifscore.filtering.config import FilteringSettings
    from prolifscore.modelserver.config import ModelServerSettings
    from prolifscore.scoring.config import ScoringSettings
    from prolifscore.tiling.config import TilingSettings
    from prolifscore.training.config import TrainingSettings
    from prolifscore.viewer.config import ViewerSettings

    return {
        "tiling": TilingSettings,
        "filtering": FilteringSettings,
        "scoring": ScoringSettings,
        "modelserver": ModelServerSettings,
        "training": TrainingSettings,
        "viewer": ViewerSettings,
    }


def config_rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, services, meaning), one row per variable across all services."""
    from prolifscore.core.runtime.settings import describe

    rows: dict[str, list] = {}
    for service, cls in all_settings().items():
        for var, default, doc in describe(cls):
            rows.setdefault(var, [var, default, [], doc])[2].append(service)
    return [(v, d, ", ".join(s), doc) for v, d, s, doc in rows.values()]


def print_config(_args: argparse.Namespace) -> int:
    print("| Variable | Default | Used by | Meaning |")
    print("|---|---|---|---|")
    for var, default, services, doc in config_rows():
        print(f"| `{var}` | `{default}` | {services} | {doc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
