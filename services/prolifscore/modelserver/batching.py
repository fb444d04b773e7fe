"""Server-side batching with TF Serving's semantics, so concurrent Predict calls on one model
version and signature share model calls (several scorers' 32-tile requests become one call).

Read from the same BatchingParameters text file the Kubernetes deployment gives TF Serving
(`--enable_batching --batching_parameters_file`); what each field does follows TF Serving's
SharedBatchScheduler and BatchingSession (sources: `shared_batch_scheduler.h`,
`batching_session.cc`, `batching_util.cc`, `bundle_factory_util.h`):

- one queue per (servable, signature); `num_batch_threads` threads shared by every queue run
  one batch each. A batch is run when it is full (`max_batch_size`) or its first task has
  waited `batch_timeout_micros`, and a thread is free: while the threads are busy, arriving
  requests merge into the open batch.
- a queue holds at most `max_enqueued_batches` batches (the open one included): past that a
  request fails UNAVAILABLE ("The batch scheduling queue ... is full"), the back-pressure TF
  Serving's clients retry on. A request larger than `max_batch_size` fails INVALID_ARGUMENT,
  unless `enable_large_batch_splitting` splits it across batches of `max_execution_batch_size`.
- `allowed_batch_sizes` pads a batch up to the next allowed size (repeating a row that is
  dropped from the outputs), so the model sees a few batch shapes only;
  `pad_variable_length_inputs` pads tensors of different non-batch sizes to the largest (with
  their first value), else such tasks fail the batch FAILED_PRECONDITION as in TF Serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2 as _wrappers  # noqa: F401  (registers wrappers.proto)

from prolifscore.modelserver.errors import ServingError

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]
RunBatch = Callable[[Arrays], Arrays]

# TF Serving's BatchingParameters (session_bundle_config.proto), built here because the
# tensorflow-serving-api wheel does not ship it: text format needs only the field names.
_WRAPPED = {
    "max_batch_size": "Int64Value",
    "batch_timeout_micros": "Int64Value",
    "max_enqueued_batches": "Int64Value",
    "num_batch_threads": "Int64Value",
    "thread_pool_name": "StringValue",
    "enable_large_batch_splitting": "BoolValue",
    "max_execution_batch_size": "Int64Value",
}


def _batching_parameters_class() -> type:
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="prolifscore/modelserver/batching_parameters.proto",
        package="prolifscore.modelserver",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = proto.message_type.add(name="BatchingParameters")
    for number, (name, wrapper) in enumerate(_WRAPPED.items(), start=1):
        msg.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            type_name=f".google.protobuf.{wrapper}",
        )
    msg.field.add(name="allowed_batch_sizes", number=20, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    msg.field.add(
        name="pad_variable_length_inputs", number=21, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL
    )
    pool = descriptor_pool.Default()
    with contextlib.suppress(TypeError):  # already added (module reloaded)
        pool.Add(proto)
    descriptor = pool.FindMessageTypeByName("prolifscore.modelserver.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)


BatchingParameters = _batching_parameters_class()


@dataclass(frozen=True)
class BatchingOptions:
    """BatchingParameters with TF Serving's defaults for the fields a file leaves out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # with splitting; 0: max_batch_size

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"batching parameter {name} must be >= 1")
        last = 0
        for i, size in enumerate(self.allowed_batch_sizes):
            if i > 0 and size <= last:
                raise ValueError("allowed_batch_sizes entries must be monotonically increasing")
            last = size
        splitting = self.enable_large_batch_splitting
        if self.allowed_batch_sizes and not splitting and last != self.max_batch_size:
            raise ValueError(
                "final entry in allowed_batch_sizes must equal max_batch_size when "
                "enable_large_batch_splitting is False"
            )

    @property
    def execution_batch_size(self) -> int:
        """The largest batch the model runs on."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size > 0:
            return self.max_execution_batch_size
        return self.max_batch_size


def parse_batching_parameters(text: str) -> BatchingOptions:
    """BatchingParameters text (TF Serving's --batching_parameters_file) -> options."""
    params = BatchingParameters()
    text_format.Parse(text, params)
    values: dict[str, object] = {
        name: getattr(params, name).value
        for name in _WRAPPED
        if name != "thread_pool_name" and params.HasField(name)
    }
    values["allowed_batch_sizes"] = tuple(params.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = params.pad_variable_length_inputs
    return BatchingOptions(**values)  # type: ignore[arg-type]


def read_batching_parameters(path: Path | None) -> BatchingOptions:
    """The file's parameters; no file: TF Serving's defaults (--enable_batching alone)."""
    return BatchingOptions() if path is None else parse_batching_parameters(path.read_text())


class QueueClosed(Exception):
    """The servable was unloaded: the caller runs its request unbatched."""


@dataclass
class _Request:
    """One Predict's inputs, split into pieces when it spans batches; done when all are."""

    inputs: Arrays
    size: int
    pieces: int = 0
    outputs: list[tuple[int, Arrays]] = field(default_factory=list)
    error: ServingError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _finished: int = 0

    def finish(self, start: int, outputs: Arrays | None, error: ServingError | None) -> None:
        """Called once per piece by the batch thread that ran it (under the scheduler lock)."""
        if outputs is not None:
            self.outputs.append((start, outputs))
        self.error = self.error or error
        self._finished += 1
        if self._finished == self.pieces:
            self.done.set()

    def result(self) -> Arrays:
        self.done.wait()
        if self.error is not None:
            raise self.error
        if len(self.outputs) == 1:
            return self.outputs[0][1]
        parts = [out for _, out in sorted(self.outputs, key=lambda p: p[0])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class _Task:
    """Rows [start, stop) of a request, in one batch."""

    request: _Request
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def inputs(self) -> Arrays:
        if self.start == 0 and self.stop == self.request.size:
            return self.request.inputs
        return {k: v[self.start : self.stop] for k, v in self.request.inputs.items()}


@dataclass
class _Batch:
    tasks: list[_Task] = field(default_factory=list)
    size: int = 0
    started: float = 0.0  # monotonic time its first task arrived

    def add(self, task: _Task) -> None:
        if not self.tasks:
            self.started = time.monotonic()
        self.tasks.append(task)
        self.size += task.size


class BatchQueue:
    """The queue of one (servable, signature): batches waiting for a batch thread, the last
    one open. Submitting blocks until the request's batches have run."""

    def __init__(self, scheduler: BatchScheduler, run: RunBatch, name: str) -> None:
        self.scheduler = scheduler
        self.options = scheduler.options
        self.run = run
        self.name = name
        self.batches: deque[_Batch] = deque([_Batch()])
        self.running = 0
        self.closed = False

    def submit(self, inputs: Arrays) -> Arrays:
        size = _batch_size(inputs)
        request = _Request(inputs, size)
        with self.scheduler.cond:
            if self.closed:
                raise QueueClosed(self.name)
            if self.options.enable_large_batch_splitting:
                self._enqueue_split(request)
            else:
                self._enqueue(request)
            self.scheduler.cond.notify_all()
        return request.result()

    def _enqueue(self, request: _Request) -> None:
        limit = self.options.max_batch_size
        if request.size > limit:
            raise _too_large(request.size, limit)
        if self.batches[-1].size + request.size > limit:
            if len(self.batches) >= self.options.max_enqueued_batches:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full; "
                    f"currently {len(self.batches)} batches enqueued and max_enqueued_batches "
                    f"is {self.options.max_enqueued_batches}",
                )
            self.batches.append(_Batch())
        request.pieces = 1
        self.batches[-1].add(_Task(request, 0, request.size))

    def _enqueue_split(self, request: _Request) -> None:
        """TF Serving's eager split: fill the open batch, then new batches of at most
        max_execution_batch_size, if the queue has the room for all of it."""
        limit, execution = self.options.max_batch_size, self.options.execution_batch_size
        if request.size > limit:
            raise _too_large(request.size, limit)
        open_size = self.batches[-1].size
        capacity = (self.options.max_enqueued_batches - len(self.batches)) * execution + (
            execution - open_size
        )
        if request.size > capacity:
            raise ServingError(
                grpc.StatusCode.UNAVAILABLE,
                "The batch scheduling queue to which this task was submitted is full; task "
                f"size is {request.size} but scheduling capacity is only {capacity} "
                f"(num_enqueued_batches={len(self.batches)}, max_enqueued_batches="
                f"{self.options.max_enqueued_batches}, open_batch_size={open_size}, "
                f"max_execution_batch_size={execution})",
            )
        start = 0
        while start < request.size:
            room = execution - self.batches[-1].size
            if room <= 0:
                self.batches.append(_Batch())
                room = execution
            stop = min(request.size, start + room)
            self.batches[-1].add(_Task(request, start, stop))
            request.pieces += 1
            start = stop

    # -- called by the scheduler under its lock
    def ready(self, now: float) -> float | None:
        """When the front batch may run (its first task's arrival), if it may run now."""
        if len(self.batches) >= 2:
            return self.batches[0].started
        batch = self.batches[0]
        if not batch.tasks:
            return None
        due = batch.started + self.options.batch_timeout_micros / 1e6
        if self.closed or batch.size >= self.options.execution_batch_size or now >= due:
            return batch.started
        return None

    def deadline(self) -> float | None:
        """When the open batch's timeout expires (the scheduler waits until then at most)."""
        batch = self.batches[-1]
        if len(self.batches) > 1 or not batch.tasks:
            return None
        return batch.started + self.options.batch_timeout_micros / 1e6

    def take(self) -> _Batch:
        batch = self.batches.popleft()
        if not self.batches:
            self.batches.append(_Batch())
        self.running += 1
        return batch

    def idle(self) -> bool:
        return self.running == 0 and len(self.batches) == 1 and not self.batches[0].tasks


def _batch_size(inputs: Arrays) -> int:
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Batching session Run() input tensors must have at least one dimension",
            )
        sizes.add(array.shape[0])
    if len(sizes) != 1:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "Batching session Run() input tensors must have equal 0th-dimension size",
        )
    return sizes.pop()


def _too_large(size: int, limit: int) -> ServingError:
    return ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Task size {size} is larger than maximum input batch size {limit}",
    )


class BatchScheduler:
    """TF Serving's SharedBatchScheduler: `num_batch_threads` threads serve every queue, each
    taking the ready batch that has waited longest."""

    def __init__(self, options: BatchingOptions) -> None:
        self.options = options
        self.cond = threading.Condition()
        self.queues: list[BatchQueue] = []
        self.batches_run = 0
        self._stop = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def add_queue(self, run: RunBatch, name: str) -> BatchQueue:
        queue = BatchQueue(self, run, name)
        with self.cond:
            self.queues.append(queue)
        return queue

    def close_queue(self, queue: BatchQueue) -> None:
        """No new requests (they run unbatched); the queued ones still run, then it goes."""
        with self.cond:
            queue.closed = True
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            for queue in self.queues:
                queue.closed = True
            self.cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _next(self) -> tuple[BatchQueue, _Batch] | None:
        """Under the lock: the ready batch whose first task has waited longest."""
        now = time.monotonic()
        best: tuple[float, BatchQueue] | None = None
        for queue in self.queues:
            since = queue.ready(now)
            if since is not None and (best is None or since < best[0]):
                best = (since, queue)
        self.queues = [q for q in self.queues if not (q.closed and q.idle())]
        return None if best is None else (best[1], best[1].take())

    def _wait_s(self) -> float | None:
        deadlines = [d for q in self.queues if (d := q.deadline()) is not None]
        return max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None

    def _loop(self) -> None:
        while True:
            with self.cond:
                picked = self._next()
                while picked is None:
                    if self._stop:
                        return
                    self.cond.wait(self._wait_s())
                    picked = self._next()
            queue, batch = picked
            results = _run_batch(queue, batch)
            with self.cond:
                queue.running -= 1
                self.batches_run += 1
                for task, (outputs, error) in zip(batch.tasks, results, strict=True):
                    task.request.finish(task.start, outputs, error)
                self.cond.notify_all()


def _run_batch(queue: BatchQueue, batch: _Batch) -> list[tuple[Arrays | None, ServingError | None]]:
    """Merge the tasks' inputs (padded as configured), run the model once, split the outputs."""
    try:
        merged, padding = _merge(batch, queue.options)
        outputs = queue.run(merged)
        total = batch.size + padding
        for array in outputs.values():
            if array.ndim == 0 or array.shape[0] != total:
                raise ServingError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "Batched output tensor's 0th dimension does not equal the sum of the 0th "
                    "dimension sizes of the input tensors",
                )
    except ServingError as exc:
        return [(None, exc)] * len(batch.tasks)
    except Exception as exc:  # a bug: every waiting request must still get an answer
        log.exception("batch failed", extra={"queue": queue.name})
        error = ServingError(grpc.StatusCode.INTERNAL, f"batch failed: {exc}")
        return [(None, error)] * len(batch.tasks)
    results: list[tuple[Arrays | None, ServingError | None]] = []
    start = 0
    for task in batch.tasks:
        stop = start + task.size
        results.append(({k: v[start:stop] for k, v in outputs.items()}, None))
        start = stop
    return results


def _merge(batch: _Batch, options: BatchingOptions) -> tuple[Arrays, int]:
    """One array per input, and the padding rows added for allowed_batch_sizes."""
    inputs = [task.inputs() for task in batch.tasks]
    padding = _padding_rows(batch.size, options.allowed_batch_sizes)
    merged: Arrays = {}
    for name in inputs[0]:
        arrays = [x[name] for x in inputs]
        if options.pad_variable_length_inputs:
            arrays = _pad_to_largest(arrays)
        else:
            reference = arrays[0].shape[1:]
            if any(a.shape[1:] != reference for a in arrays[1:]):
                raise ServingError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Tensors with name '{name}' from different tasks have different shapes "
                    "and padding is turned off.Set pad_variable_length_inputs to true, or "
                    "ensure that all tensors with the same namehave equal dimensions starting "
                    "with the first dim.",
                )
        if padding:
            arrays.append(np.repeat(arrays[-1][:1], padding, axis=0))
        merged[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return merged, padding


def _padding_rows(size: int, allowed: tuple[int, ...]) -> int:
    """Rows up to the smallest allowed batch size that holds `size` (none above them all)."""
    return next((a - size for a in allowed if a >= size), 0)


def _pad_to_largest(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """TF Serving's AddPadding: each tensor padded after its end, in every non-batch dimension,
    to the largest size among the tasks, with its own first value."""
    largest = np.max([a.shape for a in arrays], axis=0)
    padded = []
    for a in arrays:
        widths = [(0, 0)] + [(0, int(m - s)) for m, s in zip(largest[1:], a.shape[1:], strict=True)]
        if any(w for _, w in widths):
            a = np.pad(a, widths, constant_values=a.flat[0])
        padded.append(a)
    return padded
