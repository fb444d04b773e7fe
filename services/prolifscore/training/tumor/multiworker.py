"""An epoch of training steps on several Ray Train workers (MultiWorkerMirroredStrategy).

Keras 3's `fit` cannot train under a multi-worker MultiWorkerMirroredStrategy
(tensorflow/tensorflow#72388): before the first step it `strategy.reduce`s a per-replica data
batch eagerly, which fails, and it reduces every step's scalar logs with `axis=0`, which fails
too. So with more than one worker each step is Keras's own `train_step` (forward pass, the
compiled losses, gradients all-reduced across workers by the optimizer, metrics) run through
`strategy.run` in our `tf.function`; the logs are this worker's, as `fit` reports them with
one worker. One worker keeps `model.fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


class MultiWorkerFit:
    """`fit(make_dataset, steps)` for one worker of several; the traced step is kept until the
    optimizer changes (a new phase compiles a new one), as `fit` keeps its train function."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy) -> None:
        self.model = model
        self.strategy = strategy
        self._step: Any = None
        self._optimizer: Any = None

    def fit(
        self,
        make_dataset: Callable[[], tf.data.Dataset],
        steps: int,
        on_step: Callable[[int], None] = lambda step: None,
    ) -> dict[str, list[float]]:
        """Train `steps` batches of this worker's `make_dataset()` stream; returns the last
        step's logs as `fit`'s history would hold them ({name: [value]})."""
        import tensorflow as tf

        model, strategy = self.model, self.strategy
        if self._step is None or self._optimizer is not model.optimizer:
            # What `fit` builds before its first step (compiled losses and metrics, optimizer
            # slots), from the element spec of this worker's stream: shapes are all it needs.
            with strategy.scope():
                model._symbolic_build(data_batch=make_dataset().element_spec)

            @tf.function
            def step(iterator: Any) -> dict[str, tf.Tensor]:
                logs = strategy.run(model.train_step, args=(next(iterator),))
                return {k: strategy.experimental_local_results(v)[0] for k, v in logs.items()}

            self._step, self._optimizer = step, model.optimizer
        model.reset_metrics()
        iterator = iter(strategy.distribute_datasets_from_function(lambda _: make_dataset()))
        logs: dict[str, float] = {}
        for i in range(steps):
            logs = {k: float(v) for k, v in self._step(iterator).items()}
            on_step(i)
        return {k: [v] for k, v in logs.items()} if logs else {"loss": [math.nan]}
