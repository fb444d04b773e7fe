"""`make bench-training`: does the machinery learn? A check on synthetic data built from real tissue
(planted mitosis-like figures at score-defining densities), NOT a TUPAC16 result.

1. Mitosis detector: synthetic auxiliary set -> train -> export; held-out F1 (TUPAC rule).
2. Synthetic slides (with `ground_truth.csv`: tumor and molecular scores) -> the real tiling and
   filtering services (embedded broker, Ray) -> shards -> tumor-score model with its molecular
   head on Ray Train -> cut points fitted on the training slides -> export.
3. The held-out slides (18 of 96) scored as users get them: the model server and the scoring
   service in their own processes over the model root, one ScoreSlide per slide
   (`bench/served.py`) -> tumor-model kappa (the export's cut points), mitosis-route kappa,
   molecular-score Spearman.
Writes bench/validate.json: the figures, wall and CPU seconds per stage, load averages.
Targets: F1 >= 0.85, both kappas >= 0.9, Spearman >= 0.8, under 45 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
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

from bench.served import score_through_service
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
    args = parser.parse_args(argv)
    args.work = args.work.resolve()  # slide roots and Ray workers need absolute paths
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    with stage(stages, "scoring_service"):  # both service processes are reaped children
        served = score_through_service(slide_dir, models, held_out, args.work / "served")
    results.update(served)
    results["figures_from"] = "ScoreSlide of the scoring service, one call per held-out slide"
    print(
        f"through the scoring service: tumor kappa {served['tumor_model_kappa']:.3f}, "
        f"mitosis route kappa {served['mitosis_route_kappa']:.3f}, "
        f"molecular Spearman {served['molecular_spearman']}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
