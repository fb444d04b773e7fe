"""What defines a tumor-model run and what it returns: stored in checkpoints and export
metadata, so a resumed run and an exported model can say how they were trained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from prolifscore.training.data.pipeline import Balance
from prolifscore.training.schedule import cosine_lr

Backend = Literal["auto", "ray_train", "ray_actor"]


# Fewer train slides with distinct molecular scores than this: no molecular head by default
# (a regression fitted to one or two values learns nothing the scorer could use).
MIN_MOLECULAR_SLIDES = 3


class TrainingError(RuntimeError):
    """The run failed or did not finish: nothing was exported."""


@dataclass
class TumorTrainConfig:
    """Everything that defines a tumor-model run (stored in checkpoints and export metadata).

    Epochs are fixed-length (`steps_per_epoch` batches): balanced sampling makes the stream
    endless, so an "epoch" is a reporting/checkpoint interval, not a pass over the data.
    `batch_size` is the global batch (split across workers).
    """

    input_size: int = 224
    weights: str = "none"  # "none" | "imagenet" (local Keras cache only) | path to a weights file
    classes: int = 3
    batch_size: int = 16
    steps_per_epoch: int = 200
    head_epochs: int = 4
    head_lr: float = 1e-3
    finetune_epochs: int = 4
    finetune_lr: float = 1e-4
    finetune_momentum: float = 0.9
    finetune_optimizer: Literal["sgd", "adam"] = "sgd"  # adam suits training from random init
    # "cosine": each phase's rate falls per epoch from its *_lr to final_lr_fraction of it, so
    # the exported last epoch is not one of a constant rate's noisy late epochs.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    final_lr_fraction: float = 0.05
    unfreeze: Literal["conv5", "all"] = "conv5"  # what the second phase trains besides the head
    # Fine-tune with BatchNorm layers frozen in inference mode (Keras' transfer-learning advice:
    # a few hundred small batches would otherwise overwrite the statistics the backbone learnt).
    # None = freeze when starting from weights; with random init there is nothing to keep.
    freeze_batchnorm: bool | None = None
    # BatchNorm moving-average momentum (Keras: 0.99). Short runs from random init need less
    # (e.g. 0.9): after a few hundred steps 0.99 still carries the init statistics, and
    # inference-mode validation sees activations far off the batch statistics trained on.
    bn_momentum: float | None = None
    # From random init, start every residual block as the identity: the last BatchNorm of
    # each block gets gamma = 0 (Goyal et al. 2017, torchvision's zero_init_residual), so
    # the 50-layer network first trains like a shallow one. Ignored when loading weights.
    zero_init_residual: bool = True
    balance: Balance = "slide_class"
    class_weights: dict[int, float] | Literal["balanced"] | None = None
    augment: bool = True
    early_stopping_patience: int = 3  # epochs without improvement of `monitor`; 0 = off
    monitor: Literal["val_slide_kappa", "val_loss"] = "val_slide_kappa"
    restore_best: bool = True  # export the best epoch's weights, not the last
    # Fit slide-decision cut points on the training slides after training (`calibrate`).
    calibrate: bool = False
    # TUPAC16 task 2: a regression head for the molecular proliferation score beside the
    # class head, trained in the same run (masked loss: tiles of slides without a molecular
    # score contribute nothing). None = when at least MIN_MOLECULAR_SLIDES train slides carry
    # distinct molecular scores; the driver resolves it before training (`resolve_molecular`).
    molecular: bool | None = None
    molecular_loss_weight: float = 1.0
    # [mean, std] of the train slides' molecular scores: the head's units (set by the driver).
    molecular_target: list[float] | None = None
    max_eval_tiles_per_slide: int | None = 64  # bounds per-epoch validation on huge slides
    eval_batch_size: int = 64
    aggregation: Literal["mean", "rounded_mean"] = "mean"
    shuffle_buffer: int = 256
    slide_buffer: int = 16
    workers: int = 1
    cpus_per_worker: int = 0  # 0 = the Ray cluster's free CPUs / workers
    use_gpu: bool | None = None  # None = when the Ray cluster has a GPU per worker
    mixed_precision: bool | None = None  # None = on when the worker sees a GPU (never on CPU)
    seed: int = 0
    run_name: str = "tumor"
    checkpoint_dir: str | None = None  # Ray storage path; default <run_dir>/checkpoints
    tensorboard_dir: str | None = None  # default <run_dir>/tensorboard
    max_failures: int = 0  # worker restarts within one run, each resuming from the checkpoint
    backend: Backend = "auto"
    verbose: int = 0
    # Fault injection (tests): the run's first attempt raises after this epoch.
    fail_after_epoch: int | None = None

    @property
    def molecular_stats(self) -> tuple[float, float] | None:
        """(mean, std) for `build_tumor_model` when the molecular head is on, else None."""
        if not self.molecular:
            return None
        if not self.molecular_target or len(self.molecular_target) != 2:
            raise ValueError("the molecular head needs molecular_target = [mean, std]")
        return float(self.molecular_target[0]), float(self.molecular_target[1])

    @property
    def per_worker_batch(self) -> int:
        """Each worker's batch: `batch_size` is the global batch, split evenly."""
        return self.batch_size // self.workers

    @property
    def epochs(self) -> int:
        return self.head_epochs + self.finetune_epochs

    def phase(self, epoch: int) -> str:
        """Phase of 0-based `epoch`."""
        return "head" if epoch < self.head_epochs else "finetune"

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of 0-based `epoch` under `lr_schedule`."""
        if self.phase(epoch) == "head":
            base, start, length = self.head_lr, 0, self.head_epochs
        else:
            base, start, length = self.finetune_lr, self.head_epochs, self.finetune_epochs
        if self.lr_schedule == "constant":
            return base
        return cosine_lr(base, epoch - start, length, self.final_lr_fraction)

    def validate(self) -> None:
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32 for ResNet50, got {self.input_size}")
        if self.epochs <= 0 or self.steps_per_epoch <= 0 or self.batch_size <= 0:
            raise ValueError("epochs, steps_per_epoch and batch_size must be positive")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} (the global batch) must be a multiple of "
                f"workers ({self.workers})"
            )
        if self.molecular_loss_weight < 0:
            raise ValueError(
                f"molecular_loss_weight must be >= 0, got {self.molecular_loss_weight}"
            )
        if self.unfreeze not in ("conv5", "all"):
            raise ValueError(f"unfreeze must be 'conv5' or 'all', got {self.unfreeze!r}")
        if self.monitor not in ("val_slide_kappa", "val_loss"):
            raise ValueError(f"monitor must be val_slide_kappa or val_loss, got {self.monitor!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TumorTrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        cw = values.get("class_weights")
        if isinstance(cw, Mapping):  # JSON turned the int keys into strings
            values["class_weights"] = {int(k): float(v) for k, v in cw.items()}
        return cls(**values)


@dataclass
class TumorTrainResult:
    history: list[dict[str, Any]]  # one report per epoch, across resumes
    metrics: dict[str, Any]  # validation metrics of the exported (best or last) epoch
    export_path: Path | None
    checkpoint: Path
    run_dir: Path
    best_epoch: int  # 1-based
    stopped_early: bool
    resumed_from_epoch: int  # epochs already done when this invocation started (0 = fresh)
    skipped_shards: list[dict[str, str]] = field(default_factory=list)
    dataset_fingerprint: str = ""
    backend: str = ""
    seconds: float = 0.0
    weights_file: Path | None = None  # the exported (best or last) weights


def resolve_molecular(config: TumorTrainConfig, train_scores: Mapping[str, float]) -> None:
    """Decide the molecular head from the train slides' molecular scores (slide id -> score,
    known ones only) and set its units, in place. An explicit `molecular=True` without usable
    scores is an error here, before any training time is spent."""
    values = sorted(float(v) for v in train_scores.values())
    usable = len(set(values)) >= MIN_MOLECULAR_SLIDES
    if config.molecular and not usable:
        raise ValueError(
            f"molecular=True needs at least {MIN_MOLECULAR_SLIDES} train slides with distinct "
            f"molecular scores, found {len(set(values))}"
        )
    if config.molecular is None:
        config.molecular = usable
    if config.molecular and not config.molecular_target:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        config.molecular_target = [round(mean, 6), round(std, 6)]
