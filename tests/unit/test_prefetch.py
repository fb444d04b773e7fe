"""Read-ahead: `prefetched` (a function over items in an executor) and `prefetched_iter` (an
iterator's items produced in a thread of their own), as the filter workers and the scorer use
them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from prolifscore.core.wsi.prefetch import prefetched, prefetched_iter


def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    def square(x: int) -> int:
        if x == 5:
            raise ValueError("item 5")
        return x * x

    got = []
    with ThreadPoolExecutor(3) as pool, pytest.raises(ValueError, match="item 5"):
        for item, value in prefetched(range(10), square, pool, 4):
            got.append((item, value))
    assert got == [(i, i * i) for i in range(5)]


class _Source:
    """A generator of 0..n-1 recording which thread produced each item and whether it was
    closed; `produced[i]` is set once item i has been produced."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.threads: list[str] = []
        self.closed = False
        self.produced = [threading.Event() for _ in range(n)]
        self.it = self._run(n, fail_at)

    def _run(self, n: int, fail_at: int | None) -> Iterator[int]:
        try:
            for i in range(n):
                if i == fail_at:
                    raise OSError(f"read error at {i}")
                self.threads.append(threading.current_thread().name)
                self.produced[i].set()
                yield i
        finally:
            self.closed = True


def test_prefetched_iter_reads_ahead_in_one_thread_of_its_own():
    source = _Source(8)
    ahead = prefetched_iter(source.it, 2, "test-ahead")
    assert next(ahead) == 0
    # Items 1 and 2 are produced while the consumer still holds item 0.
    assert source.produced[2].wait(30)
    assert list(ahead) == list(range(1, 8))
    assert len(set(source.threads)) == 1 and source.threads[0].startswith("test-ahead")
    assert source.threads[0] != threading.current_thread().name
    assert source.closed


def test_prefetched_iter_raises_the_sources_error_at_its_item():
    source = _Source(8, fail_at=3)
    got = []
    with pytest.raises(OSError, match="read error at 3"):
        for item in prefetched_iter(source.it, 2):
            got.append(item)
    assert got == [0, 1, 2] and source.closed


def test_prefetched_iter_closed_early_leaves_nothing_running():
    source = _Source(100)
    ahead = prefetched_iter(source.it, 3, "test-early")
    assert next(ahead) == 0
    ahead.close()
    assert source.closed
    assert not [t for t in threading.enumerate() if t.name.startswith("test-early")]
    assert len(source.threads) <= 4  # the consumer's item and at most `depth` ahead
