"""Ordered read-ahead: run a function on the next items in an executor while the caller
works on the current one (slide decoding releases the GIL, so readers overlap the caller)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from contextlib import closing
from itertools import islice, repeat
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(
    items: Iterable[T], fn: Callable[[T], R], executor: Executor, depth: int
) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the items' order, `fn` running in `executor` up to `depth` items
    ahead of the consumer. A call's exception is raised here, at its item. On exit (also
    early) no call is left running."""
    pending: deque[tuple[T, Future[R]]] = deque()
    todo = iter(items)
    try:
        for item in islice(todo, max(1, depth)):
            pending.append((item, executor.submit(fn, item)))
        while pending:
            item, future = pending.popleft()
            for nxt in islice(todo, 1):
                pending.append((nxt, executor.submit(fn, nxt)))
            yield item, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        wait([f for _, f in pending])


def prefetched_iter(
    source: Iterator[T], depth: int, name: str = "prefetch"
) -> Generator[T, None, None]:
    """The items of `source` (e.g. a generator of batches), produced in a thread of their own
    up to `depth` items ahead of the consumer: `prefetched` over calls of `next(source)`, in
    one thread, so that the calls never overlap. Raises `source`'s exception at its item; on
    exit (also early) nothing is left running and `source` is closed."""
    end = object()

    def step(it: Iterator[T]) -> object:
        return next(it, end)

    try:
        with (
            ThreadPoolExecutor(1, thread_name_prefix=name) as thread,
            closing(prefetched(repeat(source), step, thread, depth)) as ahead,
        ):
            for _, item in ahead:
                if item is end:
                    return
                yield item  # type: ignore[misc]
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
