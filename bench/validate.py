"""`make bench-training`: does the machinery learn? A check on synthetic data built from real tissue
(planted mitosis-like figures at score-defining densities), NOT a TUPAC16 result.

1. Mitosis detector: synthetic auxiliary set -> train -> export; held-out F1 (TUPAC rule).
2. Synthetic slides (with `ground_truth.csv`: tumor and molecular scores) -> the real tiling and
   filtering services (embedded broker, Ray) -> shards -> tumor-score model with its molecular
   head on Ray Train -> cut points fitted on the training slides -> export.
3. The held-out slides (18 of 96) scored as users get them: the model server and the scoring
   service in their own processes over the model root, one ScoreSlide per slide
   (`bench/served.py`) -> tumor-model kappa (the export's cut points), mitosis-route kappa,
   molecular-score Spearman. Then the same slides once more with the model server in bf16
   (PROLIF_MODEL_PRECISION=bf16): its figures and its agreement with the fp32 answers
   (`served_bf16`).
`--served-only --work DIR` re-runs only the two served stages over DIR's models and slides (the
held-out slides of the figures file's `served_rows`) and merges them into that file.
Writes bench/validate.json: the figures, wall and CPU seconds per stage, load averages.
Targets: F1 >= 0.85, both kappas >= 0.9, Spearman >= 0.8, under 45 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.served import precision_agreement, served_answers, served_figures, truth_table
from bench.validation import VALIDATE_CONFIG, VALIDATE_DATA, validate_mitosis, validate_tumor

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


@contextmanager
def stage(stages: dict[str, dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """Wall seconds, CPU seconds (this process plus the children it has reaped: the embedded
    stack's services, the model server, the scoring service) and the 1-minute load average at
    both ends of one stage; the stage may add CPU seconds it knows of (the Ray Train worker's)."""
    record: dict[str, Any] = {}
    started, cpu = time.perf_counter(), _cpu()
    load = os.getloadavg()[0]
    yield record
    record.update(
        wall_s=round(time.perf_counter() - started, 1),
        cpu_s=round(_cpu() - cpu + record.pop("extra_cpu_s", 0.0), 1),
        load_average=[round(load, 2), round(os.getloadavg()[0], 2)],
    )
    stages[name] = record
    print(f"[{name}] {record}", flush=True)


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("bench/work/validate"))
    parser.add_argument("--slides", type=int, default=96, help="synthetic scored slides")
    parser.add_argument(
        "--slide-size",
        type=int,
        default=1024,
        help="side in px (0.5 um/px); a smaller slide packs its class's count into fewer tiles",
    )
    parser.add_argument("--input-size", type=int, default=96, help="tumor model input (px)")
    parser.add_argument("--steps", type=int, default=80, help="tumor model steps per epoch")
    parser.add_argument("--epochs", type=int, default=8, help="tumor model epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="tumor model batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="tumor model Adam learning rate")
    parser.add_argument("--mitosis-cases", type=int, default=VALIDATE_DATA["cases"])
    parser.add_argument("--mitosis-epochs", type=int, default=VALIDATE_CONFIG.epochs)
    parser.add_argument(
        "--parts",
        default="mitosis,tumor",
        help="comma list of mitosis, tumor (scoring through the service needs both)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="figures file")
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="only the served stages (fp32, bf16) over --work's models and slides, merged into "
        "--out (which names the held-out slides); no training, the work dir is kept",
    )
    args = parser.parse_args(argv)
    args.work = args.work.resolve()  # slide roots and Ray workers need absolute paths
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.served_only:
        return served_only(args, argv)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    models = args.work / "models"
    stages: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {
        "_note": "machinery check on synthetic data from real tissue; not a TUPAC16 result",
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    if "mitosis" in parts:
        with stage(stages, "mitosis_detector"):
            mit = validate_mitosis(
                args.work,
                data={"cases": args.mitosis_cases},
                config=replace(VALIDATE_CONFIG, epochs=args.mitosis_epochs),
                model_root=models,
            )
        results.update({"mitosis_f1": mit["mitosis_f1"], "mitosis_detail": mit})
        print(f"mitosis detector: F1 {mit['mitosis_f1']:.3f}", flush=True)
    if "tumor" in parts:
        run_tumor(args, parts, models, stages, results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["cpu_seconds"] = round(sum(s["cpu_s"] for s in stages.values()), 1)
    results["stages"] = stages
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["cores"] = os.cpu_count()
    results["command"] = "python -m bench.validate " + " ".join(argv or sys.argv[1:])
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    keys = (
        "mitosis_f1",
        "tumor_model_kappa",
        "molecular_spearman",
        "mitosis_route_kappa",
        "seconds",
        "cpu_seconds",
    )
    print(json.dumps({k: results.get(k) for k in keys}))
    return 0


def run_tumor(
    args: argparse.Namespace,
    parts: set[str],
    models: Path,
    stages: dict[str, dict[str, Any]],
    results: dict[str, Any],
) -> None:
    """Synthetic slides through the real services, the tumor model trained on Ray Train, then
    (with the detector trained too) every held-out slide scored through the scoring service."""
    from prolifscore.core.runtime.ray import init_ray
    from prolifscore.synthetic.slides import make_synthetic_slides
    from prolifscore.v1 import pipeline_pb2 as pb

    with stage(stages, "slides_and_preprocessing"):
        slide_dir = make_synthetic_slides(
            args.work / "slides", slides=args.slides, size_px=args.slide_size, seed=1
        )
        pre = preprocess_with_services(slide_dir, slide_dir / "ground_truth.csv", args.work)
    print(f"preprocessed {len(pre['splits'])} slides: {pre['kept']} tiles", flush=True)
    with stage(stages, "tumor_model") as record:
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
        record["extra_cpu_s"] = tumor["tumor_model_worker_cpu_seconds"]
    results["tumor_detail"] = tumor
    print(f"tumor model (its own validation): kappa {tumor['tumor_model_kappa']:.3f}", flush=True)
    if "mitosis" not in parts:
        results.update({k: tumor[k] for k in ("tumor_model_kappa", "molecular_spearman")})
        results["figures_from"] = "training run's validation (no scoring service: no detector)"
        return
    held_out = sorted(s for s, split in pre["splits"].items() if split == pb.SPLIT_VALIDATION)
    results.update(run_served(slide_dir, models, held_out, args.work, stages))


def run_served(
    slide_dir: Path,
    models: Path,
    held_out: list[str],
    work: Path,
    stages: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The held-out slides through the scoring service with the model server in fp32, then in
    bf16 on the same slides and models: the fp32 figures, and under `served_bf16` bf16's own
    figures with its agreement with the fp32 answers."""
    with stage(stages, "scoring_service"):  # both service processes are reaped children
        fp32, fp32_timing = served_answers(slide_dir, models, held_out, work / "served", "fp32")
    with stage(stages, "scoring_service_bf16"):
        bf16, bf16_timing = served_answers(
            slide_dir, models, held_out, work / "served_bf16", "bf16"
        )
    truth = truth_table(slide_dir)
    served = {**served_figures(truth, fp32), "served_timing": fp32_timing}
    served["figures_from"] = "ScoreSlide of the scoring service, one call per held-out slide"
    bf16_figures = served_figures(truth, bf16)
    del bf16_figures["served_rows"]  # what differs from fp32 is in agreement_with_fp32
    served["served_bf16"] = {
        "_note": "the same slides and exports, model server with PROLIF_MODEL_PRECISION=bf16, "
        "run after the fp32 stage (slides in the page cache; wall_s includes start-up: not a "
        "speed benchmark, see make bench's scoring_bf16_*)",
        **bf16_figures,
        "served_timing": bf16_timing,
        "agreement_with_fp32": precision_agreement(fp32, bf16),
    }
    for name, figures in (("fp32", served), ("bf16", served["served_bf16"])):
        print(
            f"through the scoring service ({name}): tumor kappa "
            f"{figures['tumor_model_kappa']:.3f}, mitosis route kappa "
            f"{figures['mitosis_route_kappa']:.3f}, molecular Spearman "
            f"{figures['molecular_spearman']}",
            flush=True,
        )
    print(f"bf16 vs fp32: {served['served_bf16']['agreement_with_fp32']}", flush=True)
    return served


def served_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Re-run the served stages over an existing work dir (models/, slides/), for the held-out
    slides the figures file names, and merge the new figures into it; nothing is deleted."""
    needed = [args.work / "models/resnet50", args.work / "models/mitosis"]
    missing = [p for p in [*needed, args.work / "slides/ground_truth.csv"] if not p.exists()]
    if missing:
        raise SystemExit(f"--served-only needs a trained work dir; missing: {missing}")
    existing = json.loads(args.out.read_text())
    held_out = [r["slide_id"] for r in existing.get("served_rows", [])]
    if not held_out:
        raise SystemExit(f"{args.out} has no served_rows: which slides are held out is unknown")
    load_start = [round(x, 2) for x in os.getloadavg()]
    stages: dict[str, dict[str, Any]] = {}
    served = run_served(args.work / "slides", args.work / "models", held_out, args.work, stages)
    rerun = {
        "_note": "only the served stages were re-run, over the models and slides of the "
        "training run this file describes (not retrained); every other figure, the stages and "
        "the seconds are that run's",
        "command": "python -m bench.validate " + " ".join(argv or sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "stages": stages,
    }
    args.out.write_text(json.dumps(merge_served(existing, served, rerun), indent=2) + "\n")
    return 0


def merge_served(
    existing: dict[str, Any], served: dict[str, Any], rerun: dict[str, Any]
) -> dict[str, Any]:
    """The figures file with the served keys replaced by a re-run's and the re-run described;
    the training figures stay. Says whether the fp32 rows came out as the file had them."""
    before = existing.get("served_rows")
    changed = sorted(
        a["slide_id"] for a, b in zip(before or [], served["served_rows"], strict=False) if a != b
    )
    rerun = {
        **rerun,
        "fp32_rows_as_before": before == served["served_rows"],
        "fp32_rows_changed": changed,
    }
    return {**existing, **served, "served_rerun": rerun}


if __name__ == "__main__":
    raise SystemExit(main())
