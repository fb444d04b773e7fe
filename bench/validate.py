"""`make bench-training`: does the machinery learn? A check on synthetic data built from real tissue
(planted mitosis-like figures at score-defining densities), NOT a TUPAC16 result.

1. Mitosis detector: synthetic auxiliary set -> train -> held-out F1 (TUPAC rule).
2. Synthetic slides -> the real tiling and filtering services (embedded broker, Ray) -> shards
   -> tumor-score model -> quadratic weighted kappa on the held-out validation slides.
3. Mitosis-count route: the scoring library with the trained detector on the held-out slides
   -> mitotic score -> kappa against the slide labels.
Writes bench/validate.json (mitosis_f1, tumor_model_kappa, molecular_spearman from the molecular
head the synthetic labels train, mitosis_route_kappa).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("validate.json")


def preprocess_with_services(slide_dir: Path, labels: Path, out: Path) -> dict[str, Any]:
    """Ingest every slide with its labels through the embedded runtime, as a user would."""
    from prolifscore.cli.ingest import build_messages, follow
    from prolifscore.core.runtime.bus import Bus
    from prolifscore.core.runtime.settings import KafkaSettings, load
    from prolifscore.localstack.stack import EmbeddedStack

    env = {"PROLIF_SLIDE_ROOTS": str(slide_dir), "PROLIF_TILES_ROOT": str(out / "tiles")}
    with EmbeddedStack(out / "run", env=env) as stack:
        settings = load(KafkaSettings, bootstrap_servers=stack.env["PROLIF_KAFKA_BOOTSTRAP"])
        bus = Bus(settings, "validate")
        try:
            msgs = build_messages(sorted(slide_dir.glob("*.tiff")), "validate", labels=labels)
            for m in msgs:
                bus.publish(settings.topic_ingest, m.slide_id, m)
            bus.flush()
            progress = follow(bus, settings, "validate", [m.slide_id for m in msgs], 900)
        finally:
            bus.close()
    failed = {s: p.reason for s, p in progress.items() if p.stage != "filtered"}
    if failed:
        raise RuntimeError(f"preprocessing failed: {failed}")
    splits = {m.slide_id: m.split for m in msgs}
    return {
        "tiles_root": out / "tiles",
        "splits": splits,
        "kept": sum(p.kept for p in progress.values()),
    }


def mitosis_route(slide_dir: Path, model_root: Path, slide_ids: list[str]) -> dict[str, Any]:
    from prolifscore.core.grading.evaluation import quadratic_weighted_kappa
    from prolifscore.core.runtime.settings import PreprocessSettings
    from prolifscore.scoring.model_client import InProcessModels
    from prolifscore.scoring.scorer import ScoringOptions, score_slide
    from prolifscore.v1 import scoring_pb2 as spb

    truth = {
        r["slide_id"]: int(r["tumor_score"])
        for r in csv.DictReader((slide_dir / "ground_truth.csv").read_text().splitlines())
    }
    models = InProcessModels(model_root)
    # As the service does with PROLIF_MODEL_METADATA_ROOT: the detector's exported threshold.
    options = ScoringOptions(preprocess=PreprocessSettings(), metadata_root=str(model_root))
    rows = []
    threshold = 0.0
    for slide_id in slide_ids:
        result = score_slide(
            spb.ScoreRequest(path=str(slide_dir / f"{slide_id}.tiff")),
            slide_roots=(str(slide_dir),),
            options=options,
            models=models,
        )
        rows.append(
            (truth[slide_id], result.mitotic_score, result.tumor_score, result.mitosis_count)
        )
        threshold = round(result.mitosis_threshold, 4)  # float32 in the proto
    models.close()
    y = [r[0] for r in rows]
    return {
        "mitosis_route_kappa": quadratic_weighted_kappa(y, [r[1] for r in rows]),
        "tumor_model_scoring_kappa": quadratic_weighted_kappa(y, [r[2] for r in rows]),
        "mitosis_route_slides": len(rows),
        "mitosis_route_threshold": threshold,
        "mitosis_route_rows": [list(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("bench/work/validate"))
    parser.add_argument("--slides", type=int, default=96, help="synthetic scored slides")
    parser.add_argument(
        "--slide-size",
        type=int,
        default=1024,
        help="side in px (0.5 um/px); a smaller slide packs its class's count into fewer tiles",
    )
    parser.add_argument("--input-size", type=int, default=64, help="tumor model input (px)")
    parser.add_argument("--steps", type=int, default=100, help="tumor model steps per epoch")
    parser.add_argument("--epochs", type=int, default=8, help="tumor model epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="tumor model batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="tumor model Adam learning rate")
    parser.add_argument(
        "--parts", default="mitosis,tumor", help="comma list of mitosis, tumor (route needs both)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="figures file")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    args.work = args.work.resolve()  # slide roots and Ray workers need absolute paths
    from bench.validation import validate_mitosis, validate_tumor
    from prolifscore.core.runtime.ray import init_ray
    from prolifscore.synthetic.slides import make_synthetic_slides
    from prolifscore.v1 import pipeline_pb2 as pb

    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    models = args.work / "models"
    results: dict[str, Any] = {
        "_note": "machinery check on synthetic data from real tissue; not a TUPAC16 result"
    }
    if "mitosis" in parts:
        mit = validate_mitosis(args.work, model_root=models)
        results.update({"mitosis_f1": mit["mitosis_f1"], "mitosis_detail": mit})
        print(f"mitosis detector: F1 {mit['mitosis_f1']:.3f}", flush=True)
    if "tumor" not in parts:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        return 0
    slide_dir = make_synthetic_slides(
        args.work / "slides", slides=args.slides, size_px=args.slide_size, seed=1
    )
    pre = preprocess_with_services(slide_dir, slide_dir / "ground_truth.csv", args.work)
    print(
        f"preprocessed {len(pre['splits'])} slides through the services: {pre['kept']} tiles",
        flush=True,
    )
    init_ray(num_cpus=2)
    tumor = validate_tumor(
        pre["tiles_root"],
        args.work / "runs",
        model_root=models,
        input_size=args.input_size,
        steps_per_epoch=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        finetune_lr=args.lr,
    )
    results.update(
        {
            "tumor_model_kappa": tumor["tumor_model_kappa"],
            "molecular_spearman": tumor["molecular_spearman"],
            "tumor_detail": tumor,
        }
    )
    print(
        f"tumor model: kappa {tumor['tumor_model_kappa']:.3f}, "
        f"molecular Spearman {tumor['molecular_spearman']}",
        flush=True,
    )
    if "mitosis" in parts:
        held_out = sorted(s for s, split in pre["splits"].items() if split == pb.SPLIT_VALIDATION)
        route = mitosis_route(slide_dir, models, held_out)
        results.update(route)
        print(f"mitosis route: kappa {route['mitosis_route_kappa']:.3f}", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(results, indent=2, default=str))
    keys = (
        "mitosis_f1",
        "tumor_model_kappa",
        "molecular_spearman",
        "mitosis_route_kappa",
        "seconds",
    )
    print(json.dumps({k: results.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
