"""`prolifscore` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from prolifscore.cli import ingest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prolifscore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ingest.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
