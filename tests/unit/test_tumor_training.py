"""Tumor-model training through Ray: learning, crash/resume, export, and bad inputs.

The slow tests train a real ResNet50 at 32 px (random init) on tiny synthetic slides whose
class shows in colour and nucleus density, so a few steps reach perfect slide scores when the
labels are right and clearly fail when they are scrambled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from prolifscore.core.grading.evaluation import (
    quadratic_weighted_kappa,
    slide_metrics,
    slide_scores,
)
from prolifscore.core.models.architectures import WeightsError
from prolifscore.core.models.export import read_metadata
from prolifscore.core.wsi.tfrecord import parse_tile_example, read_records
from prolifscore.training.data.shards import DatasetError, ShardRef, find_shards
from prolifscore.training.tumor.checkpoints import (
    OPTIMIZER_FILE,
    STATE_FILE,
    ActorSession,
    latest_checkpoint,
)
from prolifscore.training.tumor.config import TrainingError, TumorTrainConfig
from prolifscore.training.tumor.loop import track_best
from prolifscore.training.tumor.predict import evaluate_tiles
from prolifscore.training.tumor.train import ray_train_available, train_tumor
from tests.unit.test_training_dataset import write_slide

SIZE = 32
# Above chance (kappa 0, slide accuracy 1/3) by a wide margin. A run with the train labels
# rotated (1->2->3->1) scores about -0.5 when it learns them and 0 +- noise when it does not
# (seen 0.0 and 0.4 over 6 slides); the learning check asserts both bars, the control that
# it does not pass them together.
MIN_KAPPA = 0.6
MIN_SLIDE_ACCURACY = 0.65


def make_dataset(
    root: Path, *, rotate_train_labels: bool = False, corrupt: int = 0, molecular: bool = False
) -> Path:
    """9 train slides (3 per class, 12 tiles), 6 validation slides (2 per class, 6 tiles) with
    molecular scores (the train slides too when `molecular`)."""
    k = 0
    for score in (1, 2, 3):
        label = score % 3 + 1 if rotate_train_labels else score
        for i in range(3):
            write_slide(
                root,
                f"tr-{score}-{i}",
                label,
                "train",
                12,
                size=SIZE,
                seed=k,
                shards=2,
                look=score,
                molecular=score - 0.2 + 0.1 * i if molecular else None,
            )
            k += 1
        for i in range(2):
            write_slide(
                root,
                f"va-{score}-{i}",
                score,
                "validation",
                6,
                size=SIZE,
                seed=100 + k,
                molecular=score + 0.3 * i,
            )
            k += 1
    for shard in sorted(root.glob("tr-*/*.tfrecord"))[:corrupt]:
        data = bytearray(shard.read_bytes())
        data[40] ^= 0x55
        shard.write_bytes(bytes(data))
    return root


def small_config(**overrides: object) -> TumorTrainConfig:
    base = TumorTrainConfig(
        input_size=SIZE,
        batch_size=16,
        steps_per_epoch=6,
        head_epochs=2,
        finetune_epochs=0,
        early_stopping_patience=0,
        max_eval_tiles_per_slide=None,
        eval_batch_size=32,
        run_name="t",
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def validation_tiles(shards: list[ShardRef]) -> tuple[np.ndarray, list[str]]:
    tiles, ids = [], []
    for s in shards:
        if s.split != "validation":
            continue
        for record in read_records(s.path):
            ex = parse_tile_example(record)
            tiles.append(ex["image"])
            ids.append(s.slide_id)
    return np.stack(tiles), ids


@pytest.mark.slow
@pytest.mark.timeout(900)  # Ray Train's start-up alone is ~50 s on a loaded 2-core machine
def test_learns_resumes_after_a_crash_and_exports(tmp_path: Path) -> None:
    import tensorflow as tf

    shards = find_shards(make_dataset(tmp_path / "tiles", corrupt=1))
    models, run = tmp_path / "models", tmp_path / "run"

    # Epoch 1 completes and is checkpointed, then the worker dies; Ray restarts it and the run
    # resumes at epoch 2 from that checkpoint (not from scratch), on the same cosine curve:
    # the restored optimizer's rate is replaced by epoch 2's.
    config = small_config(
        fail_after_epoch=1, max_failures=1, lr_schedule="cosine", final_lr_fraction=0.5
    )
    result = train_tumor(config, shards, models, run)
    assert result.backend == ("ray_train" if ray_train_available()[0] else "ray_actor")
    assert result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3, 5e-4])
    with np.load(result.checkpoint / OPTIMIZER_FILE) as opt:
        scalars = [float(opt[k]) for k in opt.files if opt[k].size == 1]
    assert any(np.isclose(v, 5e-4, rtol=1e-4) for v in scalars), scalars  # the rate trained with
    final = json.loads((result.checkpoint / STATE_FILE).read_text())
    assert [r["start_epoch"] for r in final["runs"]] == [0, 1] and final["finished"]
    assert len(result.skipped_shards) == 1 and "checksum" in result.skipped_shards[0]["reason"]
    # The worker trained at normal priority, not at Ray's default nice 15 (`init_ray`).
    assert [e["nice"] for e in _journal(run, 0) if e["event"] == "start"] == [0, 0]

    # It learnt: slide-level figures far above chance on the held-out slides.
    m = result.metrics
    assert m["val_slides"] == 6
    assert m["val_slide_kappa"] >= MIN_KAPPA, result.history
    assert m["val_slide_accuracy"] >= MIN_SLIDE_ACCURACY, result.history
    assert len(m["val_tile_confusion"]) == 3 and sum(map(sum, m["val_slide_confusion"])) == 6
    assert list((run / "tensorboard" / "validation").glob("events.out.tfevents.*"))

    # The export: marked trained, carries the run's facts, and its serving signature (uint8
    # tiles in, probabilities out) reproduces the slide scores training reported.
    assert result.export_path is not None
    meta = read_metadata(result.export_path)
    assert meta["trained"] is True and meta["dataset_fingerprint"] == result.dataset_fingerprint
    assert meta["metrics"]["epoch"] == result.best_epoch and meta["input_size"] == SIZE
    assert len(meta["skipped_shards"]) == 1
    assert meta["molecular_head"] is None  # no molecular score on any train slide: no head
    assert meta["score_rule"]["default"] == "argmax" and meta["score_rule"]["cutpoints"] is None
    serve = tf.saved_model.load(str(result.export_path)).signatures["serving_default"]
    assert list(serve.structured_outputs) == ["probabilities"]
    tiles, ids = validation_tiles(shards)
    probs = serve(tiles=tf.constant(tiles))["probabilities"].numpy()
    assert probs.shape == (len(tiles), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    truth = {s.slide_id: s.tumor_score for s in shards if s.tumor_score}
    served = slide_metrics(slide_scores(probs, ids), truth)  # type: ignore[arg-type]
    assert served["accuracy"] == pytest.approx(m["val_slide_accuracy"])

    # A finished run is not silently retrained or re-exported.
    with pytest.raises(TrainingError, match="already finished"):
        train_tumor(config, shards, models, run)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_molecular_head_trains_resumes_and_exports_with_the_score_rule(tmp_path: Path) -> None:
    """Train slides with molecular scores: both heads train in one run, a crash resumes both
    from the checkpoint, the export serves `molecular_score` and states its score rule, and
    the reported figures are what the served model gives (Ray-actor backend: cheaper start)."""
    import tensorflow as tf

    from prolifscore.core.grading.evaluation import slide_decision, spearman
    from prolifscore.training.tumor.predict import slide_means

    shards = find_shards(make_dataset(tmp_path / "tiles", molecular=True))
    config = small_config(calibrate=True, fail_after_epoch=1, max_failures=1, backend="ray_actor")
    result = train_tumor(config, shards, tmp_path / "models", tmp_path / "run")
    assert config.molecular is True and result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["molecular_score_loss"]) for h in result.history)
    m = result.metrics
    assert m["val_molecular_slides"] == 6 and np.isfinite(m["val_molecular_spearman"])

    assert result.export_path is not None
    meta = read_metadata(result.export_path)
    head = meta["molecular_head"]
    assert head["trained"] is True and head["output"] == "molecular_score"
    assert [head["target_mean"], head["target_std"]] == config.molecular_target
    assert head["val_spearman"] == m["val_molecular_spearman"]
    rule = meta["score_rule"]
    assert rule["default"] == "cutpoints" and rule["fitted_on"] == "training slides"
    assert rule["cutpoints"] == meta["slide_cutpoints"] == m["slide_cutpoints"]
    assert rule["slides"] == 9

    # What the scorer will do with the export reproduces the figures training reported.
    serve = tf.saved_model.load(str(result.export_path)).signatures["serving_default"]
    tiles, ids = validation_tiles(shards)
    out = serve(tiles=tf.constant(tiles))
    assert out["molecular_score"].shape == (len(tiles),)
    served = slide_means(out["molecular_score"].numpy(), np.array(ids))
    truth = {s.slide_id: s.molecular_score for s in shards if s.split == "validation"}
    slides = sorted(served)
    rho = spearman([served[s] for s in slides], [truth[s] for s in slides])
    assert rho == pytest.approx(m["val_molecular_spearman"], abs=1e-6)
    probs = out["probabilities"].numpy()
    labels = {s.slide_id: s.tumor_score for s in shards}
    decided = []
    for s in slides:
        rows = [i for i, sid in enumerate(ids) if sid == s]
        mean = probs[rows].mean(axis=0)
        decided.append(slide_decision(mean, probs[rows].argmax(axis=1) + 1, 0, rule["cutpoints"]))
    assert {d[1] for d in decided} == {2}  # SCORE_RULE_CUTPOINTS, the model's own rule
    kappa = quadratic_weighted_kappa([labels[s] for s in slides], [d[0] for d in decided])
    assert kappa == pytest.approx(m["val_slide_kappa_calibrated"], nan_ok=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scrambled_labels_do_not_reach_the_bar(tmp_path: Path) -> None:
    """The control: same data and pipeline, train labels rotated 1->2->3->1. If this passed the
    bar, the learning check above would prove nothing. Runs through `validate_tumor` (the
    `make bench-training` entry point), reduced to one head-only epoch, on the Ray-actor backend
    (the learning check above runs on Ray Train's TensorflowTrainer where it imports)."""
    from bench.validation import validate_tumor

    root = make_dataset(tmp_path / "tiles", rotate_train_labels=True)
    figures = validate_tumor(
        root,
        tmp_path / "run",
        input_size=SIZE,
        steps_per_epoch=6,
        head_epochs=1,
        finetune_epochs=0,
        eval_batch_size=32,
        backend="ray_actor",
    )
    assert figures["tumor_model_slides"] == 6 and figures["tumor_model_tiles"] == 36
    assert figures["tumor_model_export"] is None
    reached = (
        figures["tumor_model_kappa"] >= MIN_KAPPA
        and figures["tumor_model_slide_accuracy"] >= MIN_SLIDE_ACCURACY
    )
    assert not reached, figures
    assert len(figures["tumor_model_slide_cutpoints"]) == 2
    assert figures["tumor_model_backend"] == "ray_actor"  # the fallback without Ray Train


def _journal(run: Path, rank: int) -> list[dict[str, object]]:
    path = run / "workers" / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tiles_of(share: list[list[object]]) -> list[tuple[str, int]]:
    """The tiles (slide, column) a worker's reported share holds: its records of each shard,
    read back from the files."""
    out = []
    for path, skip, stride in share:
        for record in list(read_records(str(path)))[int(skip) :: int(stride)]:  # type: ignore[call-overload]
            ex = parse_tile_example(record)
            out.append((str(ex["slide_id"]), int(ex["col"])))  # type: ignore[call-overload]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ray_train_workers_share_the_data_and_resume(tmp_path: Path) -> None:
    """Ray Train's TensorflowTrainer with 2 CPU workers (MultiWorkerMirroredStrategy): each
    worker trains on its own share of the records, the global batch is split between them,
    gradients are all-reduced (both keep identical weights), rank 0 alone checkpoints, and
    after a failure both workers resume from that checkpoint. Sized for 2 cores: 32 px, 3
    steps of 4 tiles per worker per epoch, 2 epochs."""
    if not ray_train_available()[0]:
        pytest.skip(f"Ray Train is not importable: {ray_train_available()[1]}")
    shards = find_shards(make_dataset(tmp_path / "tiles"))
    run = tmp_path / "run"
    config = small_config(
        workers=2,
        cpus_per_worker=1,
        batch_size=8,
        steps_per_epoch=3,
        backend="ray_train",
        fail_after_epoch=1,
        max_failures=1,
    )
    result = train_tumor(config, shards, None, run)
    assert result.backend == "ray_train" and result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert (result.metrics["workers"], result.metrics["global_batch"]) == (2, 8)

    journals = {rank: _journal(run, rank) for rank in (0, 1)}
    starts = {r: [e for e in j if e["event"] == "start"] for r, j in journals.items()}
    epochs = {r: [e for e in j if e["event"] == "epoch"] for r, j in journals.items()}
    # Both workers started twice: fresh, then resumed after epoch 1 from rank 0's checkpoint.
    for rank in (0, 1):
        assert [(e["rank"], e["world_size"]) for e in starts[rank]] == [(rank, 2)] * 2
        assert [(e["attempt"], e["start_epoch"]) for e in starts[rank]] == [(1, 0), (2, 1)]
        assert [e["epoch"] for e in epochs[rank]] == [1, 2]
        # Global batch 8 = 4 per worker x 2 workers, every epoch.
        assert {(e["per_worker_batch"], e["global_batch"]) for e in epochs[rank]} == {(4, 8)}
    assert [e["checkpoint"] for e in epochs[0]] == [True, True]
    assert [e["checkpoint"] for e in epochs[1]] == [False, False]
    # All-reduced gradients: after every epoch both replicas hold the same weights.
    assert [e["weights"] for e in epochs[0]] == [e["weights"] for e in epochs[1]]

    # Disjoint shares that together hold every train record exactly once.
    shares = [_tiles_of(starts[rank][0]["share"]) for rank in (0, 1)]  # type: ignore[arg-type]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    every = [t for s in shards if s.split == "train" for t in _tiles_of([[s.path, 0, 1]])]
    assert sorted(shares[0] + shares[1]) == sorted(every)
    assert [starts[r][0]["share_records"] for r in (0, 1)] == [len(shares[0]), len(shares[1])]

    # Rank 0's checkpoints are the run's: our files only, the last one finished.
    final = json.loads((result.checkpoint / STATE_FILE).read_text())
    assert final["finished"] and [r["start_epoch"] for r in final["runs"]] == [0, 1]
    assert {p.name for p in result.checkpoint.iterdir()} <= {
        STATE_FILE,
        "model.weights.h5",
        OPTIMIZER_FILE,
        "best.weights.h5",
    }


# --------------------------------------------------------------------------------------------
# Fast checks: failures before training, phases, checkpoints, metrics.


def test_failed_or_unfinished_runs_export_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the workers leave behind, only a finished run is exported."""
    from prolifscore.training.tumor import train as tumor

    shards = find_shards(make_dataset(tmp_path / "tiles"))
    models = tmp_path / "models"
    monkeypatch.setattr(tumor, "init_ray", lambda address="": None)
    monkeypatch.setattr(tumor, "_cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(tumor, "_resolve_backend", lambda config: "ray_actor")

    def dies(*args: object) -> None:
        raise RuntimeError("worker died")

    monkeypatch.setattr(tumor, "_run_ray_actor", dies)
    with pytest.raises(TrainingError, match="failed, nothing exported: worker died"):
        train_tumor(small_config(), shards, models, tmp_path / "a")
    monkeypatch.setattr(tumor, "_run_ray_actor", lambda *args: None)
    with pytest.raises(TrainingError, match="left no checkpoint"):
        train_tumor(small_config(), shards, models, tmp_path / "b")

    def stops_early(loop_config: dict[str, object], *args: object) -> None:
        ckpt = Path(str(loop_config["storage"])) / "checkpoint_000001"
        ckpt.mkdir(parents=True)
        (ckpt / STATE_FILE).write_text(json.dumps({"epoch": 1, "finished": False}))

    monkeypatch.setattr(tumor, "_run_ray_actor", stops_early)
    with pytest.raises(TrainingError, match="stopped at epoch 1: nothing exported"):
        train_tumor(small_config(), shards, models, tmp_path / "c")
    assert not models.exists()


def test_wrong_weights_fail_before_training(tmp_path: Path) -> None:
    import keras

    shards = find_shards(make_dataset(tmp_path / "tiles"))
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    bad = tmp_path / "other_model.weights.h5"
    other.save_weights(str(bad))
    with pytest.raises(WeightsError, match="does not fit"):
        train_tumor(small_config(weights=str(bad)), shards, tmp_path / "m", tmp_path / "run")
    with pytest.raises(WeightsError, match="does not exist"):
        train_tumor(small_config(weights="/no/such.h5"), shards, tmp_path / "m", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "m").exists()


def test_unusable_data_fails_before_training(tmp_path: Path) -> None:
    shards = find_shards(make_dataset(tmp_path / "tiles"))
    for s in shards:
        if s.split == "validation":
            Path(s.path).write_bytes(b"\0" * 64)
    with pytest.raises(DatasetError, match="after skipping 6 bad shards"):
        train_tumor(small_config(), shards, tmp_path / "m", tmp_path / "run")
    with pytest.raises(DatasetError, match="no 'validation'"):
        train_tumor(
            small_config(), [s for s in shards if s.split == "train"], None, tmp_path / "run"
        )
    with pytest.raises(ValueError, match="input_size"):
        train_tumor(small_config(input_size=16), shards, None, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_phase_trains_the_last_block_and_head() -> None:
    from prolifscore.core.models.architectures import build_tumor_model
    from prolifscore.training.tumor.model import configure_phase

    model = build_tumor_model(SIZE, "none")
    config = small_config(freeze_batchnorm=True)  # default: only when starting from weights
    configure_phase(model, "head", config)
    assert {v.path.split("/")[0] for v in model.trainable_variables} == {"tumor_score"}
    assert type(model.optimizer).__name__ == "Adam"
    configure_phase(model, "finetune", config)
    names = [v.path for v in model.trainable_variables]
    assert all("conv5_" in n or n.startswith("tumor_score") for n in names)
    assert any("conv5_block3_3_conv" in n for n in names)
    assert not any("_bn/" in n for n in names)  # BatchNorm stays in inference mode
    assert type(model.optimizer).__name__ == "SGD"
    assert float(model.optimizer.momentum) == pytest.approx(0.9)
    configure_phase(model, "finetune", small_config(unfreeze="all"))  # random init: BN trains
    names = [v.path for v in model.trainable_variables]
    assert any("conv1_conv" in n for n in names) and any("_bn/" in n for n in names)


def test_zero_init_residual_starts_every_block_as_its_shortcut() -> None:
    import keras

    from prolifscore.core.models.architectures import build_tumor_model
    from prolifscore.training.tumor.model import zero_residual_gammas

    model = build_tumor_model(SIZE, "none")
    backbone = model.get_layer("resnet50")
    assert zero_residual_gammas(backbone) == 16  # ResNet50: 3 + 4 + 6 + 3 blocks
    x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype("float32")
    # An identity block (conv2_block2) now returns relu(its input): the residual branch is 0.
    block_in = backbone.get_layer("conv2_block1_out").output
    block_out = backbone.get_layer("conv2_block2_out").output
    inside = keras.Model(backbone.input, [block_in, block_out])
    before, after = (np.asarray(t) for t in inside(x, training=False))
    np.testing.assert_allclose(after, np.maximum(before, 0), atol=1e-5)
    assert np.abs(before).max() > 0


def test_checkpoint_bookkeeping(tmp_path: Path) -> None:
    session = ActorSession(tmp_path / "store", num_to_keep=2)
    for epoch in (1, 2, 3):
        d = tmp_path / f"c{epoch}"
        d.mkdir()
        (d / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
        session.report({"epoch": epoch}, d)
    kept = sorted(p.name for p in (tmp_path / "store").glob("checkpoint_*"))
    assert kept == ["checkpoint_000002", "checkpoint_000003"]
    assert latest_checkpoint(tmp_path / "store") == tmp_path / "store" / "checkpoint_000003"
    with session.get_checkpoint() as ckpt:
        assert ckpt == tmp_path / "store" / "checkpoint_000003"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_early_stopping_bookkeeping() -> None:
    state = {"best_value": None, "best_epoch": 0, "wait": 0, "stopped_early": False}
    config = small_config(early_stopping_patience=2)
    for epoch, kappa in enumerate([0.2, 0.5, float("nan"), 0.5, 0.9], start=1):
        track_best(state, kappa, epoch, config)
        if state["stopped_early"]:
            break
    assert (epoch, state["best_epoch"], state["best_value"]) == (4, 2, 0.5)
    state = {"best_value": None, "best_epoch": 0, "wait": 0, "stopped_early": False}
    loss = small_config(monitor="val_loss", early_stopping_patience=0)
    for epoch, value in enumerate([1.0, 0.7, 0.8, 0.9, 0.95], start=1):
        track_best(state, value, epoch, loss)
    assert state["best_epoch"] == 2 and not state["stopped_early"]  # patience 0: never stops


def test_config_round_trip() -> None:
    config = small_config(class_weights={1: 1.0, 3: 2.5})
    again = TumorTrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.epochs == 2 and again.phase(1) == "head"
    seed = TumorTrainConfig()
    assert (seed.input_size, seed.head_epochs, seed.head_lr) == (224, 4, 1e-3)
    assert (seed.finetune_lr, seed.finetune_momentum, seed.unfreeze) == (1e-4, 0.9, "conv5")


def test_cosine_schedule_restarts_for_each_phase() -> None:
    config = small_config(
        head_epochs=3,
        finetune_epochs=2,
        finetune_lr=1e-4,
        lr_schedule="cosine",
        final_lr_fraction=0.1,
    )
    rates = [config.learning_rate(e) for e in range(config.epochs)]
    assert rates == pytest.approx([1e-3, 5.5e-4, 1e-4, 1e-4, 1e-5])
    assert small_config().learning_rate(1) == 1e-3  # constant, the default
    with pytest.raises(ValueError, match="lr_schedule"):
        small_config(lr_schedule="step").validate()


def test_epoch_metrics() -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    pred = {
        "probs": probs,
        "labels": np.array([0, 0, 2, 2]),
        "slide_ids": np.array(["a", "a", "b", "b"]),
        "molecular": np.full(4, np.nan),
    }
    m = evaluate_tiles(pred, {"a": 1, "b": 3}, {"a": 0.1, "b": 0.9})
    assert m["val_tile_accuracy"] == 0.75
    assert m["val_tile_confusion"] == [[2, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert m["val_slide_accuracy"] == 1.0 and m["val_slides"] == 2
    assert m["val_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.6, 0.7, 0.3])))


# --------------------------------------------------------------------------------------------
# The molecular head (TUPAC16 task 2) and the exported score rule.


def test_masked_molecular_loss_ignores_unknown_targets() -> None:
    import tensorflow as tf

    from prolifscore.training.tumor.model import masked_molecular_loss

    loss = masked_molecular_loss(std=0.5)
    y_true = tf.constant([np.nan, 1.0, np.nan, 3.0])
    y_pred = tf.Variable([[5.0], [1.5], [-2.0], [2.0]])
    with tf.GradientTape() as tape:
        per_tile = loss(y_true, y_pred)
        total = tf.reduce_sum(per_tile)
    # ((1.5 - 1) / 0.5)^2 = 1 and ((2 - 3) / 0.5)^2 = 4; unknown targets give 0 ...
    np.testing.assert_allclose(per_tile.numpy(), [0.0, 1.0, 0.0, 4.0])
    # ... and no gradient (not NaN: the NaN target never enters the arithmetic).
    grad = tape.gradient(total, y_pred).numpy().ravel()
    np.testing.assert_allclose(grad, [0.0, 2 * 0.5 / 0.25, 0.0, 2 * -1.0 / 0.25])


def test_resolve_molecular_from_the_train_slides() -> None:
    from prolifscore.training.tumor.config import resolve_molecular

    config = small_config()
    resolve_molecular(config, {"a": 0.1, "b": 0.5, "c": 0.9})
    assert config.molecular is True
    # Population std of (0.1, 0.5, 0.9): sqrt(0.32 / 3).
    assert config.molecular_target == pytest.approx([0.5, (0.32 / 3) ** 0.5], abs=1e-6)
    assert config.molecular_stats == pytest.approx((0.5, (0.32 / 3) ** 0.5), abs=1e-6)
    few = small_config()
    resolve_molecular(few, {"a": 0.1, "b": 0.1, "c": 0.9})  # two distinct values: no head
    assert few.molecular is False and few.molecular_stats is None
    with pytest.raises(ValueError, match="needs at least 3 train slides"):
        resolve_molecular(small_config(molecular=True), {"a": 0.1})
    off = small_config(molecular=False)
    resolve_molecular(off, {"a": 0.1, "b": 0.5, "c": 0.9})
    assert off.molecular is False
    with pytest.raises(ValueError, match="multiple of workers"):
        small_config(batch_size=16, workers=3).validate()


def test_checkpoints_of_another_head_layout_are_not_resumed(tmp_path: Path) -> None:
    from prolifscore.training.tumor.loop import _check_resumable

    with_head = small_config(molecular=True, molecular_target=[0.5, 0.2])
    saved = {"dataset_fingerprint": "f", "config": small_config(molecular=False).to_dict()}
    with pytest.raises(TrainingError, match="has molecular=False, this run True"):
        _check_resumable(tmp_path, saved, with_head, "f")
    old = {"dataset_fingerprint": "f", "config": {"input_size": SIZE, "classes": 3}}
    _check_resumable(tmp_path, old, small_config(molecular=False), "f")  # before the head
    with pytest.raises(TrainingError, match="molecular=False"):
        _check_resumable(tmp_path, old, with_head, "f")


@pytest.mark.slow
def test_molecular_head_export_signature_and_metadata(tmp_path: Path) -> None:
    """With the head the signature adds `molecular_score` float32 [N] (tile values) and the
    metadata says whether the head is trained; without it the export is today's."""
    import tensorflow as tf

    from prolifscore.core.models.export import export_untrained

    plain = export_untrained(tmp_path, "tumor", input_size=SIZE)
    meta = read_metadata(plain)
    assert list(meta["outputs"]) == ["probabilities"] and meta["molecular_head"] is None
    fn = tf.saved_model.load(str(plain)).signatures["serving_default"]
    assert list(fn.structured_outputs) == ["probabilities"]

    both = export_untrained(tmp_path, "tumor", input_size=SIZE, molecular=(0.5, 0.2))
    meta = read_metadata(both)
    assert sorted(meta["outputs"]) == ["molecular_score", "probabilities"]  # JSON keys sorted
    assert meta["molecular_head"] == {
        "output": "molecular_score",
        "trained": False,
        "slide_value": "mean of tiles",
    }
    fn = tf.saved_model.load(str(both)).signatures["serving_default"]
    tiles = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    out = fn(tiles=tf.constant(tiles))
    assert sorted(out) == ["molecular_score", "probabilities"]
    assert out["molecular_score"].dtype == tf.float32 and out["molecular_score"].shape == (3,)
    assert out["probabilities"].shape == (3, 3)


def test_molecular_metrics_on_validation_slides() -> None:
    probs = np.full((6, 3), 1 / 3)
    pred = {
        "probs": probs,
        "labels": np.array([0, 0, 1, 1, 2, 2]),
        "slide_ids": np.array(["a", "a", "b", "b", "c", "c"]),
        "molecular": np.full(6, np.nan),
        "molecular_pred": np.array([0.0, 0.2, 0.5, 0.3, 0.3, 0.9]),  # slide means .1, .4, .6
    }
    m = evaluate_tiles(pred, {"a": 1, "b": 2, "c": 3}, {"a": 1.0, "b": 0.5, "c": 2.0})
    # Ranks (1, 2, 3) against (2, 1, 3): 1 - 6 * (1 + 1 + 0) / (3 * 8) = 0.5.
    assert m["val_molecular_spearman"] == pytest.approx(0.5)
    assert m["val_molecular_mae"] == pytest.approx((0.9 + 0.1 + 1.4) / 3)
    assert m["val_molecular_slides"] == 3
    del pred["molecular_pred"]  # no head: no molecular figures
    assert "val_molecular_spearman" not in evaluate_tiles(pred, {"a": 1}, {})
