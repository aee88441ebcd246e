"""BatchPrefetcher: decode the next micro-batches on background threads while the current one trains.

The trainer knows a whole interval's micro-batches in advance. The prefetcher loads them
in order, at most `depth` ahead of the consumer, on `depth` threads: the codec's zstd and
numpy work release the GIL, so the loads overlap the training step and each other. What
`next()` returns is exactly what loading in the step would give, in the same order; a
load's exception is re-raised by `next()` in the consumer's thread. `close()` drops what
is queued and waits for the loads in flight (at most `depth`); after it, or with depth 0,
`next()` loads synchronously.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

Keys = TypeVar("Keys")
Batch = TypeVar("Batch")


class BatchPrefetcher(Generic[Keys, Batch]):
    def __init__(self, load: Callable[[Keys], Batch], batches: Sequence[Keys], depth: int):
        self._load, self._batches, self._depth = load, list(batches), depth
        self._next = 0  # index of the batch next() returns
        self._pending: deque[Future] = deque()  # loads of batches _next, _next + 1, ...
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="batch-prefetch") if depth > 0 else None
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self._depth and self._next + len(self._pending) < len(self._batches):
            self._pending.append(self._pool.submit(self._load, self._batches[self._next + len(self._pending)]))

    def next(self) -> tuple[Keys, Batch]:
        """The next batch's keys and the loaded batch."""
        if self._next >= len(self._batches):
            raise IndexError(f"all {len(self._batches)} prefetched batches were taken")
        keys = self._batches[self._next]
        try:
            batch = self._pending.popleft().result() if self._pending else self._load(keys)
        except BaseException:
            self.close()
            raise
        self._next += 1
        if self._next == len(self._batches):
            self.close()  # the last one: free the threads now
        self._fill()
        return keys, batch

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
