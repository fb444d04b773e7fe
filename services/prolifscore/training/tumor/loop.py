"""The training loop every worker runs (`train_loop_per_worker`: Ray Train's per-worker
function; `LocalWorker` runs it in a plain Ray actor): build the model, resume from the latest
checkpoint, then per epoch set the phase and learning rate, fit, score the validation split,
checkpoint and report.

Every worker evaluates the whole (capped) validation set, so all reach the same early-stop
decision without a collective; only rank 0 writes checkpoints and TensorBoard logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prolifscore.training.data.pipeline import Augment, eval_dataset, train_dataset
from prolifscore.training.data.shards import ShardRef, worker_share
from prolifscore.training.tumor.checkpoints import (
    BEST_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    Session,
    session_for,
)
from prolifscore.training.tumor.config import TrainingError, TumorTrainConfig
from prolifscore.training.tumor.model import (
    build_for_worker,
    configure_phase,
    load_optimizer,
    save_optimizer,
)
from prolifscore.training.tumor.multiworker import MultiWorkerFit
from prolifscore.training.tumor.predict import (
    capped_tiles,
    evaluate_tiles,
    predict_all,
    predictor,
    slide_labels,
)

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)


def track_best(state: dict[str, Any], value: float, epoch: int, config: TumorTrainConfig) -> None:
    """Early-stopping bookkeeping after 1-based `epoch` scored `value` on `config.monitor`:
    best value/epoch, epochs without improvement, and whether to stop. A NaN (e.g. kappa on a
    single-class validation set) never counts as an improvement."""
    best = state["best_value"]
    lower = config.monitor == "val_loss"
    improved = math.isfinite(value) and (best is None or (value < best if lower else value > best))
    if improved:
        state.update(best_value=value, best_epoch=epoch, wait=0)
    else:
        state["wait"] += 1
    patience = config.early_stopping_patience
    if patience and state["wait"] >= patience:
        state["stopped_early"] = True


def _step_clock() -> Any:
    """A Keras callback noting batch end times, for the steady-state training speed (the first
    step of an epoch also traces the graph). Built lazily: Keras is imported on workers only."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter())

        def images_per_second(self, batch_size: int) -> float:
            if len(self.times) < 2:
                return math.nan
            return (len(self.times) - 1) * batch_size / (self.times[-1] - self.times[0])

    return StepClock()


class ScalarWriter:
    """Per-epoch scalars in TensorBoard's event format: train/* and validation/* runs."""

    def __init__(self, log_dir: Path) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        self._writers = {
            run: tf.summary.create_file_writer(str(log_dir / run))
            for run in ("train", "validation")
        }

    def write(self, metrics: Mapping[str, Any], epoch: int) -> None:
        tf = self._tf
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value) or key == "epoch":
                continue
            run = "validation" if key.startswith("val_") else "train"
            with self._writers[run].as_default(step=epoch):
                tf.summary.write(
                    f"epoch_{key.removeprefix('val_')}",
                    tf.constant(float(value), tf.float32),
                    metadata=self._meta,
                )
        for writer in self._writers.values():
            writer.flush()


class WorkerJournal:
    """What one worker did, as JSON lines in `<run_dir>/workers/rank-<r>.jsonl`: its share of
    the train records when it starts, then per epoch its batch, whether it wrote the
    checkpoint, and a digest of its trainable weights (equal on every worker when gradients
    are all-reduced). Ray Train keeps only rank 0's metrics; this keeps every worker's."""

    def __init__(self, folder: str, rank: int) -> None:
        self.path = Path(folder) / f"rank-{rank}.jsonl" if folder else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **event: Any) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(event, default=str) + "\n")


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of the trainable weights' bytes."""
    h = hashlib.sha256()
    for v in model.trainable_variables:
        h.update(np.ascontiguousarray(np.asarray(v.numpy())).tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Worker:
    """One worker's part of the run: what every step of the loop reads or changes."""

    config: TumorTrainConfig
    shards: list[ShardRef]
    session: Session
    model: keras.Model
    strategy: tf.distribute.Strategy
    work: Path  # scratch: an epoch's checkpoint until it is reported, the best weights so far
    journal: WorkerJournal
    multiworker: MultiWorkerFit = field(init=False)  # the steps with several workers

    def __post_init__(self) -> None:
        self.multiworker = MultiWorkerFit(self.model, self.strategy)

    @property
    def chief(self) -> bool:
        return self.session.rank == 0

    @property
    def best_weights(self) -> Path:
        return self.work / BEST_FILE


@dataclass
class _Validation:
    """The (capped) validation split every worker scores after each epoch, and its labels."""

    dataset: tf.data.Dataset
    truth: dict[str, int]
    molecular: dict[str, float]
    tiles: int


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, (resume,) train, evaluate, checkpoint, report.

    `loop_config` (a dict, as Ray Train passes it on): the run's `config`, `shards`,
    `fingerprint`, `backend`, `storage`, `tensorboard_dir`, `workers_dir` (the journals) and
    the driver's `resume_from`.
    """
    session = session_for(loop_config["backend"], Path(loop_config["storage"]))
    config = TumorTrainConfig.from_dict(loop_config["config"])
    shards = [ShardRef(**s) for s in loop_config["shards"]]
    model, strategy = build_for_worker(config)
    validation = _validation(config, shards)
    work = Path(tempfile.mkdtemp(prefix="tumor-train-"))
    journal = WorkerJournal(loop_config.get("workers_dir", ""), session.rank)
    worker = _Worker(config, shards, session, model, strategy, work, journal)
    state = _fresh_state(config, loop_config["fingerprint"])
    _resume(worker, state, loop_config)
    state["runs"].append({"start_epoch": state["epoch"], "backend": loop_config["backend"]})
    _journal_start(worker, state)

    # Rank 0 logs every epoch's metrics as TensorBoard scalars. Keras' TensorBoard callback
    # (tf.summary.scalar) needs the tensorboard package; tf.summary.write does not.
    board = ScalarWriter(Path(loop_config["tensorboard_dir"])) if worker.chief else None
    augment = Augment() if config.augment else Augment.off()
    predict = predictor(model, math.ceil(validation.tiles / config.eval_batch_size))

    epoch = int(state["epoch"])
    while epoch < config.epochs and not state["finished"]:
        metrics = _run_epoch(worker, state, epoch, augment, validation, predict)
        epoch += 1
        _record_epoch(state, metrics, epoch, config)
        if board is not None:
            board.write(metrics, epoch)
        _checkpoint_and_report(worker, state, metrics, epoch)
        inject = config.fail_after_epoch
        if inject is not None and len(state["runs"]) == 1 and epoch >= inject:
            raise RuntimeError(f"injected failure after epoch {epoch}")
    shutil.rmtree(work, ignore_errors=True)


def _journal_start(worker: _Worker, state: dict[str, Any]) -> None:
    """The worker's place and its share of the train records, as it starts (or resumes)."""
    rank, world = worker.session.rank, worker.session.world_size
    share = worker_share([s for s in worker.shards if s.split == "train"], rank, world)
    worker.journal.write(
        event="start",
        rank=rank,
        world_size=world,
        attempt=len(state["runs"]),
        start_epoch=state["epoch"],
        share_records=sum(p.records for p in share),
        nice=os.nice(0),  # Ray's default worker niceness (15) starves training on a busy machine
        share=[[p.shard.path, p.skip, p.stride] for p in share],
    )


def _validation(config: TumorTrainConfig, shards: list[ShardRef]) -> _Validation:
    truth, molecular = slide_labels(shards)
    cap = config.max_eval_tiles_per_slide
    dataset = eval_dataset(
        shards,
        input_size=config.input_size,
        batch_size=config.eval_batch_size,
        split="validation",
        max_tiles_per_slide=cap,
    )
    return _Validation(dataset, truth, molecular, capped_tiles(shards, "validation", cap))


def _fresh_state(config: TumorTrainConfig, fingerprint: str) -> dict[str, Any]:
    """The run's state before its first epoch; checkpointed as `state.json` after each."""
    return {
        "epoch": 0,
        "phase": None,
        "history": [],
        "best_value": None,
        "best_epoch": 0,
        "wait": 0,
        "finished": False,
        "stopped_early": False,
        "runs": [],
        "dataset_fingerprint": fingerprint,
        "config": config.to_dict(),
    }


def _resume(worker: _Worker, state: dict[str, Any], loop_config: Mapping[str, Any]) -> None:
    """Continue from the session's checkpoint (else the driver's `resume_from`, if any): its
    state, weights, phase with the optimizer state, and the best weights so far."""
    config, model = worker.config, worker.model
    with worker.session.get_checkpoint() as ckpt:
        if ckpt is None and loop_config.get("resume_from"):
            ckpt = Path(loop_config["resume_from"])
        if ckpt is None:
            return
        saved = json.loads((ckpt / STATE_FILE).read_text())
        _check_resumable(ckpt, saved, config, loop_config["fingerprint"])
        state.update(saved, config=config.to_dict())
        with worker.strategy.scope():
            model.load_weights(str(ckpt / WEIGHTS_FILE))
            if state["phase"] is not None:
                configure_phase(model, state["phase"], config)
                load_optimizer(model, ckpt / OPTIMIZER_FILE)
        if (ckpt / BEST_FILE).is_file():
            shutil.copy(ckpt / BEST_FILE, worker.best_weights)
        elif state["best_epoch"] == state["epoch"]:
            shutil.copy(ckpt / WEIGHTS_FILE, worker.best_weights)
        log.info("resuming", extra={"epoch": state["epoch"], "checkpoint": str(ckpt)})


def _check_resumable(
    ckpt: Path, saved: Mapping[str, Any], config: TumorTrainConfig, fingerprint: str
) -> None:
    if saved.get("dataset_fingerprint") != fingerprint:
        raise TrainingError(
            f"checkpoint {ckpt} was trained on data set "
            f"{saved.get('dataset_fingerprint')}, this run has "
            f"{fingerprint}: use a new run name"
        )
    # What the weights' shapes depend on; checkpoints from before the molecular head had none.
    saved_config = {"molecular": False, "molecular_target": None, **saved.get("config", {})}
    for key in ("input_size", "classes", "molecular", "molecular_target"):
        if saved_config.get(key, getattr(config, key)) != getattr(config, key):
            raise TrainingError(
                f"checkpoint {ckpt} has {key}={saved_config[key]}, this run "
                f"{getattr(config, key)}: use a new run name"
            )


def _run_epoch(
    worker: _Worker,
    state: dict[str, Any],
    epoch: int,
    augment: Augment,
    validation: _Validation,
    predict: Any,
) -> dict[str, Any]:
    """Train 0-based `epoch` (in its phase, at its learning rate), then score the validation
    split: the epoch's report."""
    config, model = worker.config, worker.model
    phase = config.phase(epoch)
    if phase != state["phase"]:
        with worker.strategy.scope():
            configure_phase(model, phase, config)
        state["phase"] = phase
    lr = config.learning_rate(epoch)
    model.optimizer.learning_rate.assign(lr)
    ds = _epoch_dataset(worker, epoch, augment)
    per_worker_batch = _batch_dim(ds)
    global_batch = per_worker_batch * worker.strategy.num_replicas_in_sync
    started, cpu_started = time.perf_counter(), time.process_time()
    clock = _step_clock()
    if worker.session.world_size > 1:  # Keras' fit cannot (multiworker.py)
        history = worker.multiworker.fit(
            lambda: _epoch_dataset(worker, epoch, augment),
            config.steps_per_epoch,
            clock.on_train_batch_end,
        )
    else:
        history = model.fit(
            ds,
            steps_per_epoch=config.steps_per_epoch,
            initial_epoch=epoch,
            epochs=epoch + 1,
            verbose=config.verbose,
            callbacks=[clock],
        ).history
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    loss = float(history["loss"][-1])
    acc = next((v for k, v in sorted(history.items()) if k.endswith("accuracy")), [math.nan])
    if not math.isfinite(loss):
        raise TrainingError(f"training loss is {loss} at epoch {epoch + 1}")
    started, cpu_started = time.perf_counter(), time.process_time()
    pred = predict_all(predict, validation.dataset)
    return {
        "epoch": epoch + 1,
        "phase": phase,
        "lr": lr,
        "loss": loss,
        "accuracy": float(acc[-1]),
        **evaluate_tiles(pred, validation.truth, validation.molecular, config.aggregation),
        **{k: float(v[-1]) for k, v in history.items() if k.startswith("molecular")},
        "workers": worker.session.world_size,
        "per_worker_batch": per_worker_batch,
        "global_batch": global_batch,
        "train_s": round(train_s, 2),
        # This worker process's CPU seconds (every thread): on a shared machine the wall
        # seconds also count other people's load, these much less.
        "train_cpu_s": round(train_cpu_s, 2),
        "train_img_s": round(config.steps_per_epoch * global_batch / train_s, 2),
        "steady_img_s": round(clock.images_per_second(global_batch), 2),
        "eval_s": round(time.perf_counter() - started, 2),
        "eval_cpu_s": round(time.process_time() - cpu_started, 2),
    }


def _epoch_dataset(worker: _Worker, epoch: int, augment: Augment) -> tf.data.Dataset:
    """The epoch's training stream, seeded by epoch and rank: a resumed epoch draws the same
    tiles, and workers draw different ones, each from its own share of the train shards
    (`worker_share`), `per_worker_batch` tiles per step."""
    config, rank, world = worker.config, worker.session.rank, worker.session.world_size
    return train_dataset(
        worker.shards,
        input_size=config.input_size,
        batch_size=config.per_worker_batch,
        seed=config.seed + 1009 * epoch + 7919 * rank,
        balance=config.balance,
        class_weights=config.class_weights,
        augment=augment,
        shuffle_buffer=config.shuffle_buffer,
        slide_buffer=config.slide_buffer,
        classes=config.classes,
        molecular=bool(config.molecular),
        rank=rank,
        world=world,
    )


def _batch_dim(ds: Any) -> int:
    """The static batch dimension of the images a worker's stream yields per step."""
    import tensorflow as tf

    spec = tf.nest.flatten(ds.element_spec, expand_composites=True)[0]
    return int(spec.shape[0])


def _record_epoch(
    state: dict[str, Any], metrics: dict[str, Any], epoch: int, config: TumorTrainConfig
) -> None:
    """Note 1-based `epoch`'s report in the state: early stopping, history, whether done."""
    track_best(state, float(metrics[config.monitor]), epoch, config)
    state["epoch"] = epoch
    state["finished"] = epoch >= config.epochs or state["stopped_early"]
    state["history"].append(metrics)
    log.info("epoch done", extra={k: v for k, v in metrics.items() if "confusion" not in k})


def _checkpoint_and_report(
    worker: _Worker, state: dict[str, Any], metrics: dict[str, Any], epoch: int
) -> None:
    """Report 1-based `epoch` to the session, with a checkpoint from rank 0, and keep this
    epoch's weights as the best so far when they are."""
    model = worker.model
    ckpt_dir: Path | None = None
    if worker.chief:
        ckpt_dir = worker.work / f"epoch_{epoch:06d}"
        ckpt_dir.mkdir()
        model.save_weights(str(ckpt_dir / WEIGHTS_FILE))
        save_optimizer(model, ckpt_dir / OPTIMIZER_FILE)
        if worker.best_weights.is_file() and state["best_epoch"] != epoch:
            # Only when the best epoch is an earlier one: ResNet50 weights are ~94 MB.
            shutil.copy(worker.best_weights, ckpt_dir / BEST_FILE)
        (ckpt_dir / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: complete
    worker.session.report({**metrics, "finished": state["finished"]}, ckpt_dir)
    worker.journal.write(
        event="epoch",
        epoch=epoch,
        checkpoint=ckpt_dir is not None,
        per_worker_batch=metrics["per_worker_batch"],
        global_batch=metrics["global_batch"],
        weights=weights_digest(model),
    )
    if ckpt_dir is not None:
        if state["best_epoch"] == epoch:  # keep this epoch's weights as the best so far
            if (ckpt_dir / WEIGHTS_FILE).is_file():
                os.replace(ckpt_dir / WEIGHTS_FILE, worker.best_weights)
            else:  # the reporter consumed the folder
                model.save_weights(str(worker.best_weights))
        shutil.rmtree(ckpt_dir, ignore_errors=True)


class LocalWorker:
    """Ray actor running the loop when Ray Train is not importable (one worker)."""

    def run(self, loop_config: dict[str, Any]) -> None:
        train_loop_per_worker(loop_config)
