"""Server-side batching with TF Serving's parameters: the scheduler on its own (merging, queue
full, too-large requests, splitting, allowed batch sizes, variable-length padding), and the
model server with batching on, through the standard gRPC client: concurrent Predicts share model
calls and get the same outputs as unbatched calls."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from google.protobuf import text_format  # noqa: E402

from prolifscore.core.models.export import export_untrained  # noqa: E402
from prolifscore.modelserver.batching import (  # noqa: E402
    BatchingOptions,
    BatchScheduler,
    parse_batching_parameters,
    read_batching_parameters,
)
from prolifscore.modelserver.errors import ServingError  # noqa: E402
from tests.modelserving import predict_request, start_server, tiles, wait_for  # noqa: E402

K8S = Path(__file__).parents[2] / "k8s"
Arrays = dict[str, np.ndarray]


def test_batching_parameters_files_read_as_tf_serving_reads_them(tmp_path: Path) -> None:
    base = read_batching_parameters(K8S / "base" / "config" / "batching.config")
    assert (base.max_batch_size, base.batch_timeout_micros) == (64, 5000)
    assert (base.max_enqueued_batches, base.num_batch_threads) == (64, 4)
    gpu = read_batching_parameters(K8S / "components" / "gpu" / "config" / "gpu-batching.config")
    assert (gpu.max_batch_size, gpu.num_batch_threads) == (128, 2)
    # fields left out take TF Serving's defaults; the newer fields parse too
    options = parse_batching_parameters(
        "max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n"
        "pad_variable_length_inputs: true\nenable_large_batch_splitting { value: true }\n"
        "max_execution_batch_size { value: 4 }\nthread_pool_name { value: 'x' }"
    )
    assert options.allowed_batch_sizes == (4, 8) and options.pad_variable_length_inputs
    assert options.execution_batch_size == 4 and options.max_enqueued_batches == 10
    assert options.batch_timeout_micros == 0 and read_batching_parameters(None) == BatchingOptions()
    with pytest.raises(ValueError, match="monotonically increasing"):
        parse_batching_parameters("max_batch_size { value: 8 } allowed_batch_sizes: [8, 4]")
    with pytest.raises(ValueError, match="final entry in allowed_batch_sizes must equal"):
        parse_batching_parameters("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4]")
    with pytest.raises(text_format.ParseError):
        parse_batching_parameters("max_batch_sizes { value: 8 }")


class Model:
    """A stand-in model (y = 2x, and the row sums), recording each call's batch size; `gate`
    holds calls until set, so tests can fill the queue while the batch thread is busy."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def __call__(self, inputs: Arrays) -> Arrays:
        self.running.set()
        self.gate.wait(30)
        x = inputs["x"]
        self.sizes.append(len(x))
        return {"y": x * 2, "sum": x.reshape(len(x), -1).sum(axis=1)}


@pytest.fixture
def batching() -> Iterator[Callable[..., tuple[BatchScheduler, object, Model]]]:
    schedulers: list[BatchScheduler] = []

    def make(**options: object) -> tuple[BatchScheduler, object, Model]:
        scheduler = BatchScheduler(BatchingOptions(num_batch_threads=1, **options))  # type: ignore[arg-type]
        schedulers.append(scheduler)
        model = Model()
        return scheduler, scheduler.add_queue(model, "test"), model

    yield make
    for scheduler in schedulers:
        scheduler.stop()


def _rows(n: int, start: int = 0, width: int = 3) -> Arrays:
    return {"x": np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)}


def _submit_async(pool: ThreadPoolExecutor, queue: object, inputs: Arrays):  # type: ignore[no-untyped-def]
    return pool.submit(queue.submit, inputs)  # type: ignore[attr-defined]


def _queued(queue: object) -> list[int]:
    with queue.scheduler.cond:  # type: ignore[attr-defined]
        return [b.size for b in queue.batches]  # type: ignore[attr-defined]


def test_requests_waiting_for_the_batch_thread_share_one_call(batching) -> None:  # type: ignore[no-untyped-def]
    scheduler, queue, model = batching(max_batch_size=16, max_enqueued_batches=4)
    model.gate.clear()
    with ThreadPoolExecutor(8) as pool:
        first = _submit_async(pool, queue, _rows(2))
        assert model.running.wait(10)  # the only batch thread is busy with the first request
        later = [_submit_async(pool, queue, _rows(n, start=100 * n)) for n in (1, 2, 3)]
        wait_for(lambda: _queued(queue) == [6])
        model.gate.set()
        results = [first.result(timeout=30)] + [f.result(timeout=30) for f in later]
    assert model.sizes == [2, 6] and scheduler.batches_run == 2
    for (n, start), result in zip([(2, 0), (1, 100), (2, 200), (3, 300)], results, strict=True):
        inputs = _rows(n, start)["x"]
        np.testing.assert_array_equal(result["y"], inputs * 2)
        np.testing.assert_array_equal(result["sum"], inputs.sum(axis=1))


def test_full_queue_is_unavailable_and_too_large_is_invalid(batching) -> None:  # type: ignore[no-untyped-def]
    _, queue, model = batching(max_batch_size=4, max_enqueued_batches=2)
    with pytest.raises(ServingError) as too_large:
        queue.submit(_rows(5))
    assert too_large.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert too_large.value.message == "Task size 5 is larger than maximum input batch size 4"
    model.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        running = _submit_async(pool, queue, _rows(4))
        assert model.running.wait(10)
        queued = [_submit_async(pool, queue, _rows(3)), _submit_async(pool, queue, _rows(2))]
        wait_for(lambda: _queued(queue) == [3, 2])
        with pytest.raises(ServingError) as full:
            queue.submit(_rows(3))  # fits neither batch, and no room for a third
        assert full.value.code == grpc.StatusCode.UNAVAILABLE
        assert full.value.message == (
            "The batch scheduling queue to which this task was submitted is full; currently 2 "
            "batches enqueued and max_enqueued_batches is 2"
        )
        model.gate.set()
        assert [len(f.result(timeout=30)["y"]) for f in [running, *queued]] == [4, 3, 2]


def test_large_batch_splitting(batching) -> None:  # type: ignore[no-untyped-def]
    _, queue, model = batching(
        max_batch_size=10,
        enable_large_batch_splitting=True,
        max_execution_batch_size=4,
        max_enqueued_batches=3,
    )
    result = queue.submit(_rows(10))
    np.testing.assert_array_equal(result["y"], _rows(10)["x"] * 2)
    assert sorted(model.sizes) == [2, 4, 4]
    model.gate.clear()
    model.running.clear()  # set by the calls above: wait for the busy call's own start
    with ThreadPoolExecutor(2) as pool:
        busy = _submit_async(pool, queue, _rows(4))
        assert model.running.wait(10)
        waiting = _submit_async(pool, queue, _rows(9))  # fills the open batch and two more
        wait_for(lambda: sum(_queued(queue)) == 9)
        with pytest.raises(ServingError) as full:
            queue.submit(_rows(10))
        assert full.value.code == grpc.StatusCode.UNAVAILABLE
        assert full.value.message.startswith(
            "The batch scheduling queue to which this task was submitted is full; task size is "
            "10 but scheduling capacity is only "
        )
        model.gate.set()
        assert len(busy.result(timeout=30)["y"]) == 4 and len(waiting.result(timeout=30)["y"]) == 9


def test_allowed_batch_sizes_pad_the_batch_not_the_answer(batching) -> None:  # type: ignore[no-untyped-def]
    _, queue, model = batching(max_batch_size=8, allowed_batch_sizes=(2, 4, 8))
    result = queue.submit(_rows(3))
    assert model.sizes == [4]  # the model saw an allowed size
    np.testing.assert_array_equal(result["y"], _rows(3)["x"] * 2)


def _different_widths(batching, pad: bool) -> tuple[list[object], Model]:  # type: ignore[no-untyped-def]
    _, queue, model = batching(max_batch_size=8, pad_variable_length_inputs=pad)
    model.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        busy = _submit_async(pool, queue, _rows(1))
        assert model.running.wait(10)
        narrow, wide = _rows(1, width=2), _rows(2, start=50, width=3)
        pair = [_submit_async(pool, queue, narrow), _submit_async(pool, queue, wide)]
        wait_for(lambda: _queued(queue) == [3])
        model.gate.set()
        busy.result(timeout=30)
        outcomes: list[object] = []
        for future in pair:
            try:
                outcomes.append(future.result(timeout=30))
            except ServingError as exc:
                outcomes.append(exc)
    return outcomes, model


def test_tasks_of_different_shapes(batching) -> None:  # type: ignore[no-untyped-def]
    """TF Serving fails the whole batch unless pad_variable_length_inputs, which pads each
    tensor with its own first value up to the largest."""
    outcomes, _ = _different_widths(batching, pad=False)
    for outcome in outcomes:
        assert isinstance(outcome, ServingError)
        assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "have different shapes and padding is turned off" in outcome.message
    outcomes, model = _different_widths(batching, pad=True)
    narrow, wide = outcomes
    assert model.sizes == [1, 3]
    np.testing.assert_array_equal(narrow["y"], [[0, 2, 0]])  # type: ignore[index]
    np.testing.assert_array_equal(wide["y"], _rows(2, start=50)["x"] * 2)  # type: ignore[index]


# -- through the model server
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    export_untrained(root, "mitosis")
    return root


def _batching_server(root: Path, tmp: Path, config: str):  # type: ignore[no-untyped-def]
    path = tmp / "batching.config"
    path.write_text(config)
    return start_server(root, batching=True, batching_config=path)


def test_concurrent_predicts_share_model_calls_with_unbatched_outputs(
    root: Path, tmp_path: Path
) -> None:
    config = (
        "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 200000 }\n"
        "max_enqueued_batches { value: 16 }\nnum_batch_threads { value: 1 }\n"
    )
    server, client = _batching_server(root, tmp_path, config)
    try:
        servable = server.manager.served["mitosis"][1]
        local = tf.saved_model.load(str(root / "mitosis" / "1")).signatures["serving_default"]
        requests = [tiles(4, 64, 64, seed=i) for i in range(12)]
        before = servable.model_calls
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda t: client.run(predict_request("mitosis", t)), requests))
        calls = servable.model_calls - before
        assert 1 <= calls < len(requests), f"{calls} model calls for {len(requests)} requests"
        for pixels, answer in zip(requests, answers, strict=True):
            served = tf.make_ndarray(answer.outputs["mitosis_map"])
            expected = local(tiles=tf.constant(pixels))["mitosis_map"].numpy()
            np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
        # a request larger than max_batch_size: TF Serving's error, not a split
        code, message = client.code(lambda: client.run(predict_request("mitosis", tiles(65, 8, 8))))
        assert (code, message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "Task size 65 is larger than maximum input batch size 64",
        )
    finally:
        server.stop()


def test_full_queue_answers_unavailable_over_grpc(root: Path, tmp_path: Path) -> None:
    """One open batch allowed, filled slowly (a long timeout): a request that does not fit is
    refused at once with TF Serving's status, which clients retry on."""
    config = (
        "max_batch_size { value: 4 }\nbatch_timeout_micros { value: 60000000 }\n"
        "max_enqueued_batches { value: 1 }\nnum_batch_threads { value: 1 }\n"
    )
    server, client = _batching_server(root, tmp_path, config)
    try:
        (queue,) = [q for q in server.batcher.queues if q.name == "mitosis/1/serving_default"]
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(client.run, predict_request("mitosis", tiles(2, 32, 32)))
            wait_for(lambda: _queued(queue) == [2])
            code, message = client.code(
                lambda: client.run(predict_request("mitosis", tiles(3, 32, 32)))
            )
            assert code == grpc.StatusCode.UNAVAILABLE
            assert message.startswith("The batch scheduling queue to which this task was")
            filling = pool.submit(client.run, predict_request("mitosis", tiles(2, 32, 32, 1)))
            for future in (waiting, filling):  # the batch is full now: it runs
                answer = future.result(timeout=60).outputs["mitosis_map"]
                assert tf.make_ndarray(answer).shape == (2, 4, 4)
    finally:
        server.stop()


def test_batching_config_without_batching_is_refused(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 4 }")
    with pytest.raises(ValueError, match="without setting PROLIF_MODEL_SERVER_BATCHING"):
        start_server(root, batching_config=path)
