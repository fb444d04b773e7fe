"""The driver of a tumor-model run (`train_tumor`): check the inputs before any training time
is spent, run the loop on Ray (Ray Train, or one Ray actor where Ray Train cannot be
imported), then calibrate and export the finished run's best (or last) weights."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before anything imports Ray: it sets the loopback-only environment Ray reads at import.
from prolifscore.core.runtime.ray import init_ray
from prolifscore.training.data.shards import (
    DatasetError,
    ShardCheck,
    ShardRef,
    check_dataset,
    dataset_fingerprint,
    describe,
    verify_shards,
)
from prolifscore.training.tumor.checkpoints import (
    BEST_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    latest_checkpoint,
)
from prolifscore.training.tumor.config import (
    TrainingError,
    TumorTrainConfig,
    TumorTrainResult,
    resolve_molecular,
)
from prolifscore.training.tumor.loop import LocalWorker, train_loop_per_worker
from prolifscore.training.tumor.model import check_weights, load_trained
from prolifscore.training.tumor.predict import calibrate, score_rule_metadata, slide_labels

log = logging.getLogger(__name__)


def ray_train_available() -> tuple[bool, str]:
    """Whether Ray Train's TensorflowTrainer imports here, and why not."""
    try:
        from ray.train.tensorflow import TensorflowTrainer  # noqa: F401
    except Exception as exc:  # ImportError for pandas / pyarrow / pydantic
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _cluster_resources() -> dict[str, float]:
    """Resources free now: on a shared cluster (other services' actors) asking for the total
    would leave the worker group unschedulable until Ray Train's start timeout."""
    import ray

    return dict(ray.available_resources())


def _resolve_backend(config: TumorTrainConfig) -> str:
    ok, why = ray_train_available()
    if config.backend == "ray_train" and not ok:
        raise TrainingError(f"Ray Train is not importable ({why}): install ray[train]")
    if config.backend == "ray_actor" or not ok:
        if config.workers > 1:
            raise TrainingError(f"{config.workers} workers need Ray Train ({why})")
        if config.backend == "auto":
            log.warning("ray.train unavailable, running the loop in a Ray actor: %s", why)
        return "ray_actor"
    return "ray_train"


def _run_ray_train(
    config: TumorTrainConfig, loop_config: dict[str, Any], storage: Path, cpus: int, gpu: bool
) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if gpu else {})},
        ),
        run_config=RunConfig(
            storage_path=str(storage.parent),
            name=storage.name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    trainer.fit()  # raises TrainingFailedError when the workers fail


def _run_ray_actor(
    loop_config: dict[str, Any], cpus: int, gpu: bool, max_failures: int = 0
) -> None:
    """One worker in a Ray actor; a failed attempt is retried in a fresh actor (up to
    `max_failures` times) that resumes from the newest checkpoint, as Ray Train would."""
    import ray

    actor_cls = ray.remote(LocalWorker).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
    for attempt in range(max_failures + 1):
        actor = actor_cls.remote()  # type: ignore[attr-defined]
        try:
            ray.get(actor.run.remote(loop_config))
            return
        except Exception as exc:
            if attempt == max_failures:
                raise
            log.warning("training attempt %d failed, retrying: %s", attempt + 1, exc)
        finally:
            ray.kill(actor)  # a fresh process per attempt: TF sets up collectives once


@dataclass
class _Run:
    """One invocation of a run, its inputs checked: what the loop trains on, where it writes."""

    config: TumorTrainConfig
    run_dir: Path
    checked: ShardCheck  # `good` shards are trained on, `bad` ones skipped and reported
    fingerprint: str
    storage: Path  # this run name's checkpoints
    tensorboard: Path
    resume_from: Path | None  # the newest checkpoint an earlier, unfinished invocation left

    def loop_config(self, backend: str) -> dict[str, Any]:
        """What `train_loop_per_worker` receives (plain values: Ray ships them to workers)."""
        return {
            "config": self.config.to_dict(),
            "shards": [asdict(s) for s in self.checked.good],
            "fingerprint": self.fingerprint,
            "backend": backend,
            "storage": str(self.storage),
            "tensorboard_dir": str(self.tensorboard),
            "workers_dir": str(self.run_dir / "workers"),
            "resume_from": str(self.resume_from) if self.resume_from else "",
        }


def train_tumor(
    config: TumorTrainConfig,
    shards: Sequence[ShardRef],
    model_root: Path | None,
    run_dir: Path,
    *,
    ray_address: str = "",
) -> TumorTrainResult:
    """Train (or resume) the tumor-score model and export it to `model_root` (None: no export).

    Re-running with the same `run_dir` and `config.run_name` resumes from the newest
    checkpoint at the next epoch. `config.molecular` and `config.molecular_target` are
    resolved in place from the train slides' molecular scores (`resolve_molecular`), so the
    caller's config rebuilds the trained model (`load_trained`). Raises `DatasetError` /
    `WeightsError` before training for unusable inputs and `TrainingError` when the run fails
    or stops before finishing; in every failure case nothing is exported.
    """
    started = time.perf_counter()
    config.validate()
    run = _prepare(config, shards, Path(run_dir).resolve())
    backend = _train_on_ray(run, ray_address)
    final, state = _finished_checkpoint(run.storage)
    metrics, weights_file = _chosen_epoch(config, final, state)
    export_path = _calibrate_and_export(run, state, backend, metrics, weights_file, model_root)
    return TumorTrainResult(
        history=state["history"],
        metrics=metrics,
        export_path=export_path,
        checkpoint=final,
        run_dir=run.run_dir,
        best_epoch=int(metrics["epoch"]),
        stopped_early=bool(state["stopped_early"]),
        resumed_from_epoch=int(state["runs"][-1]["start_epoch"]),
        skipped_shards=run.checked.report()["skipped"],
        dataset_fingerprint=run.fingerprint,
        backend=backend,
        seconds=round(time.perf_counter() - started, 2),
        weights_file=weights_file,
    )


def _prepare(config: TumorTrainConfig, shards: Sequence[ShardRef], run_dir: Path) -> _Run:
    """Everything checked that can be before training: data set, shards, weights, and whether
    this run name may (re)start here."""
    check_dataset(shards, require_labels=True, require_splits=("train", "validation"))
    checked = _verified(shards)
    _, molecular = slide_labels([s for s in checked.good if s.split == "train"])
    resolve_molecular(config, molecular)
    check_weights(config)
    fingerprint = dataset_fingerprint(checked.good)
    storage = (
        Path(config.checkpoint_dir).resolve() if config.checkpoint_dir else run_dir / "checkpoints"
    )
    storage = storage / config.run_name
    tb_dir = Path(config.tensorboard_dir) if config.tensorboard_dir else run_dir / "tensorboard"
    run_dir.mkdir(parents=True, exist_ok=True)
    return _Run(
        config=config,
        run_dir=run_dir,
        checked=checked,
        fingerprint=fingerprint,
        storage=storage,
        tensorboard=tb_dir,
        resume_from=_resume_point(storage, fingerprint),
    )


def _verified(shards: Sequence[ShardRef]) -> ShardCheck:
    """Every shard verified; the bad ones skipped, and the rest still a usable data set."""
    checked = verify_shards(shards)
    for shard, why in checked.bad:
        log.warning("skipping shard", extra={"path": shard.path, "reason": why})
    if checked.bad:
        log.warning("%d of %d shards skipped", len(checked.bad), len(shards))
    try:
        check_dataset(checked.good, require_labels=True, require_splits=("train", "validation"))
    except DatasetError as exc:
        raise DatasetError(
            f"{exc} after skipping {len(checked.bad)} bad shards "
            f"(e.g. {checked.bad[0][0].path}: {checked.bad[0][1]})"
            if checked.bad
            else str(exc)
        ) from exc
    return checked


def _resume_point(storage: Path, fingerprint: str) -> Path | None:
    """The checkpoint an unfinished earlier invocation of this run left (None: a fresh run).
    A finished run, or one on another data set, is not continued."""
    done = latest_checkpoint(storage)
    if done is not None:
        previous = json.loads((done / STATE_FILE).read_text())
        if previous.get("finished"):
            raise TrainingError(
                f"run {storage} already finished ({done}); use a new run name or run directory"
            )
        if previous.get("dataset_fingerprint") not in (None, fingerprint):
            raise TrainingError(
                f"run {storage} was started on data set {previous['dataset_fingerprint']}, "
                f"this one is {fingerprint}: use a new run name or run directory"
            )
    return done


def _train_on_ray(run: _Run, ray_address: str) -> str:
    """Run the loop on the chosen backend until it finishes or fails; returns the backend."""
    config = run.config
    init_ray(ray_address)
    backend = _resolve_backend(config)
    resources = _cluster_resources()
    gpu = resources.get("GPU", 0) >= config.workers if config.use_gpu is None else config.use_gpu
    cpus = config.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // config.workers)
    loop_config = run.loop_config(backend)
    log.info(
        "training tumor model",
        extra={
            "backend": backend,
            "data": describe(run.checked.good),
            "resume": str(run.resume_from or ""),
        },
    )
    try:
        if backend == "ray_train":
            _run_ray_train(config, loop_config, run.storage, cpus, gpu)
        else:
            _run_ray_actor(loop_config, cpus, gpu, config.max_failures)
    except Exception as exc:
        raise TrainingError(f"tumor training failed, nothing exported: {exc}") from exc
    return backend


def _finished_checkpoint(storage: Path) -> tuple[Path, dict[str, Any]]:
    """The run's last checkpoint and its state, provided the run finished."""
    final = latest_checkpoint(storage)
    if final is None:
        raise TrainingError(f"the run left no checkpoint under {storage}: nothing exported")
    state = json.loads((final / STATE_FILE).read_text())
    if not state.get("finished"):
        raise TrainingError(f"the run stopped at epoch {state['epoch']}: nothing exported")
    return final, state


def _chosen_epoch(
    config: TumorTrainConfig, final: Path, state: dict[str, Any]
) -> tuple[dict[str, Any], Path]:
    """The exported epoch's metrics and weights file: the best epoch's (`restore_best`) or
    the last one's."""
    history = state["history"]
    best_epoch = int(state["best_epoch"]) or len(history)
    use_best = config.restore_best and (final / BEST_FILE).is_file()
    if config.restore_best and best_epoch != len(history) and not use_best:
        raise TrainingError(f"{final} lacks the weights of the best epoch {best_epoch}")
    metrics = dict(history[best_epoch - 1] if config.restore_best else history[-1])
    return metrics, final / (BEST_FILE if use_best else WEIGHTS_FILE)


def _calibrate_and_export(
    run: _Run,
    state: dict[str, Any],
    backend: str,
    metrics: dict[str, Any],
    weights_file: Path,
    model_root: Path | None,
) -> Path | None:
    """Fit slide cut points when `calibrate` asks (their figures join `metrics`), and export
    the chosen weights when there is a `model_root`; returns the export's path."""
    config = run.config
    if model_root is None and not config.calibrate:
        return None
    model = load_trained(config, weights_file)
    calibration = calibrate(model, config, run.checked.good) if config.calibrate else None
    if calibration:
        metrics.update(calibration)
    if model_root is None:
        return None
    from prolifscore.core.models.contract import TUMOR_MOLECULAR_OUTPUT
    from prolifscore.core.models.export import export_model

    meta = {
        "trained": True,
        "config": config.to_dict(),
        "metrics": metrics,
        "epoch": metrics["epoch"],
        "epochs_run": len(state["history"]),
        "stopped_early": state["stopped_early"],
        "dataset_fingerprint": run.fingerprint,
        "dataset": describe(run.checked.good),
        "skipped_shards": run.checked.report()["skipped"],
        "backend": backend,
        "aggregation": config.aggregation,
        "score_rule": score_rule_metadata(config, calibration),
    }
    if calibration:
        meta["slide_cutpoints"] = calibration["slide_cutpoints"]  # the keys before score_rule
    stats = config.molecular_stats
    if stats is not None:
        meta["molecular_head"] = {
            "output": TUMOR_MOLECULAR_OUTPUT,
            "trained": True,
            "slide_value": "mean of tiles",
            "target_mean": stats[0],
            "target_std": stats[1],
            "val_spearman": metrics.get("val_molecular_spearman"),
            "val_slides": metrics.get("val_molecular_slides"),
        }
    return export_model(model, "tumor", Path(model_root), metadata=meta)
