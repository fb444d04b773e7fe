"""The tumor model as training sees it: built for a worker, configured per phase (what trains,
with which optimizer), its optimizer state saved and restored, and reloaded for export."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prolifscore.core.models.architectures import random_init
from prolifscore.training.tumor.config import TrainingError, TumorTrainConfig

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)


def build_for_worker(config: TumorTrainConfig) -> tuple[keras.Model, tf.distribute.Strategy]:
    """The model inside a MultiWorkerMirroredStrategy, in mixed precision on a GPU, with the
    same initial weights on every worker (seeded), zero-init residuals and BatchNorm momentum
    as `config` asks."""
    import keras
    import tensorflow as tf

    from prolifscore.core.models.architectures import build_tumor_model

    gpu = bool(tf.config.list_physical_devices("GPU"))
    mixed = gpu if config.mixed_precision is None else (config.mixed_precision and gpu)
    if config.mixed_precision and not gpu:
        log.warning("mixed precision requested but no GPU: training in float32")
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(config.seed)  # same initial weights on every worker
    with strategy.scope():
        model = build_tumor_model(
            config.input_size, config.weights, config.classes, config.molecular_stats
        )
    if config.zero_init_residual and random_init(config.weights):
        zero_residual_gammas(model.get_layer("resnet50"))
    if config.bn_momentum is not None:
        for layer in model.get_layer("resnet50").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.bn_momentum
    return model, strategy


def zero_residual_gammas(backbone: Any) -> int:
    """Set gamma = 0 in the last BatchNorm of every ResNet50 residual block
    (`convN_blockM_3_bn`): each block's residual branch then starts at zero and the block as
    the identity (or its projection shortcut). Returns the number of layers changed."""
    changed = 0
    for layer in backbone.layers:
        if layer.name.startswith("conv") and layer.name.endswith("_3_bn"):
            gamma = layer.gamma
            gamma.assign(np.zeros(gamma.shape, gamma.dtype))
            changed += 1
    return changed


def configure_phase(model: keras.Model, phase: str, config: TumorTrainConfig) -> None:
    """Freeze/unfreeze and compile for `phase` (call inside the strategy scope)."""
    import keras

    backbone = model.get_layer("resnet50")
    if phase == "head":
        backbone.trainable = False
        optimizer: keras.optimizers.Optimizer = keras.optimizers.Adam(config.head_lr)
    else:
        backbone.trainable = True
        freeze_bn = config.freeze_batchnorm
        if freeze_bn is None:
            freeze_bn = not random_init(config.weights)
        # Every layer's flag is set explicitly: Keras 3 does not pass `trainable` on from a
        # Functional model to its layers, so flags from an earlier phase would otherwise stay.
        for layer in backbone.layers:
            if config.unfreeze == "conv5" and not layer.name.startswith("conv5_"):
                layer.trainable = False
            elif freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # inference mode: keeps the learnt statistics
            else:
                layer.trainable = True
        if config.finetune_optimizer == "adam":
            optimizer = keras.optimizers.Adam(config.finetune_lr)
        else:
            optimizer = keras.optimizers.SGD(config.finetune_lr, momentum=config.finetune_momentum)
    weighted = config.class_weights is not None
    accuracy: Any = ["accuracy"]
    loss: Any = "sparse_categorical_crossentropy"
    loss_weights = None
    stats = config.molecular_stats
    if stats is not None:
        accuracy = {"tumor_score": ["accuracy"]}
        loss = {"tumor_score": loss, "molecular_score": masked_molecular_loss(stats[1])}
        loss_weights = {"tumor_score": 1.0, "molecular_score": config.molecular_loss_weight}
    model.compile(
        optimizer=optimizer,
        loss=loss,
        loss_weights=loss_weights,
        metrics=None if weighted else accuracy,
        weighted_metrics=accuracy if weighted else None,
    )


def masked_molecular_loss(std: float) -> Any:
    """Squared error in units of the train slides' std, per tile; 0 where the target is NaN
    (a slide without a molecular score), so those tiles add nothing to loss or gradient."""
    import tensorflow as tf

    def molecular_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        target = tf.reshape(tf.cast(y_true, tf.float32), [-1])
        value = tf.reshape(tf.cast(y_pred, tf.float32), [-1])
        known = tf.math.is_finite(target)
        error = tf.where(known, (value - tf.where(known, target, 0.0)) / std, 0.0)
        return tf.square(error)

    return molecular_loss


def save_optimizer(model: keras.Model, path: Path) -> None:
    store: dict[str, np.ndarray] = {}
    model.optimizer.save_own_variables(store)
    np.savez(path, **store)


def load_optimizer(model: keras.Model, path: Path) -> None:
    """Optimizer slots (Adam moments / SGD momentum) and its step counter, so a resumed
    run continues the same optimisation instead of restarting it cold."""
    model.optimizer.build(model.trainable_variables)
    with np.load(path) as data:
        store = {k: data[k] for k in data.files}
    if len(store) != len(model.optimizer.variables):
        raise TrainingError(
            f"checkpoint optimizer state has {len(store)} variables, the model's optimizer "
            f"{len(model.optimizer.variables)}: the checkpoint belongs to another configuration"
        )
    model.optimizer.load_own_variables(store)


def check_weights(config: TumorTrainConfig) -> None:
    """Build the model once with the requested weights: a missing, offline or wrong-shaped
    weights file raises `WeightsError` here, not minutes later on a worker."""
    if random_init(config.weights):
        return
    from prolifscore.core.models.architectures import build_tumor_model

    build_tumor_model(config.input_size, config.weights, config.classes, config.molecular_stats)


def load_trained(config: TumorTrainConfig, weights_file: Path) -> keras.Model:
    """The model in float32 with a checkpoint's weights (export and driver-side scoring)."""
    import keras

    from prolifscore.core.models.architectures import build_tumor_model

    keras.mixed_precision.set_global_policy("float32")
    model = build_tumor_model(config.input_size, "none", config.classes, config.molecular_stats)
    model.load_weights(str(weights_file))
    return model
