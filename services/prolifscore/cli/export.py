"""`prolifscore export`: stored results as QuPath GeoJSON and as a predictions CSV."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prolifscore.core.results import (
    ResultStore,
    StoredResult,
    predictions_csv,
    read_result_file,
    tile_stride0,
    to_geojson,
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export", help="a stored result as QuPath GeoJSON, results as a predictions CSV"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=Path(os.environ.get("PROLIF_RESULTS_ROOT", "data/results")),
        help="results root (default: PROLIF_RESULTS_ROOT or data/results)",
    )
    p.add_argument("--result", type=Path, help="one result file instead of the results root")
    p.add_argument("--slide", help="slide id: its latest result (GeoJSON; CSV of that slide only)")
    p.add_argument("--geojson", type=Path, help="write QuPath GeoJSON of one result here")
    p.add_argument(
        "--csv", type=Path, help="write slide_id,tumor_score (prolifscore evaluate's input) here"
    )
    p.add_argument(
        "--tile-side",
        type=int,
        help="tile side in level-0 pixels, when the result's tiles cannot tell it",
    )
    p.set_defaults(func=run)


def _selected(args: argparse.Namespace) -> list[StoredResult]:
    if args.result is not None:
        return [read_result_file(args.result)]
    store = ResultStore(args.results)
    if args.slide:
        found = store.latest(args.slide)
        if found is None:
            raise ValueError(f"no result for slide {args.slide!r} under {args.results}")
        return [found]
    latest = store.latest_by_slide()
    if not latest:
        raise ValueError(f"no result under {args.results}")
    return [latest[s] for s in sorted(latest)]


def run(args: argparse.Namespace) -> int:
    if args.geojson is None and args.csv is None:
        print("error: nothing to write: give --geojson and/or --csv", file=sys.stderr)
        return 2
    try:
        results = _selected(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.geojson is not None:
        if len(results) != 1:
            ids = ", ".join(r.score.slide_id for r in results)
            print(f"error: GeoJSON is per slide: pick one with --slide ({ids})", file=sys.stderr)
            return 2
        score = results[0].score
        side = args.tile_side or tile_stride0(score)
        if score.tiles and not side:
            print("warning: tile side unknown, tiles left out (give --tile-side)", file=sys.stderr)
        collection = to_geojson(score, side)
        args.geojson.write_text(json.dumps(collection))
        print(f"geojson {args.geojson}: {len(collection['features'])} features of {score.slide_id}")
    if args.csv is not None:
        args.csv.write_text(predictions_csv(r.score for r in results))
        print(f"csv {args.csv}: {len(results)} slides")
    return 0
