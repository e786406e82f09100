"""Batches read ahead by a background thread, so a GPU never waits for the host to cut the next batch.

The batches are the `ShardLoader`'s own, byte for byte and in the same order, and the position saved
is that of the last batch handed out, so a checkpoint resumes exactly where the training loop was.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .loader import ShardLoader

# How long a blocked put / get waits before it looks at the stop flag or the thread's health again.
_POLL_SECONDS = 0.1


class _Failure:
    """What the thread hands over instead of a batch when reading one raised."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PrefetchLoader:
    """`loader`'s batches (x, y), each int64 (batch_size, seq_len), read `depth` batches ahead.

    >>> batches = PrefetchLoader(ShardLoader("data/shakespeare", "train", batch_size=8, seq_len=256),
    ...                          pin_memory=torch.cuda.is_available())
    >>> x, y = batches.next_batch()          # the thread starts on the first call
    >>> x = x.to("cuda", non_blocking=True)
    >>> state = batches.state_dict()         # the position after the batches handed out so far
    >>> batches.close()                      # or `with PrefetchLoader(...) as batches:`
    """

    def __init__(self, loader: ShardLoader, depth: int = 2, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._position = (loader.epoch, loader.cursor)  # of the last batch handed out
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)

    @property
    def epoch(self) -> int:
        return self._position[0]

    @property
    def cursor(self) -> int:
        return self._position[1]

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._read_ahead, args=(self._stop, self._queue), name="gpt2lab-prefetch", daemon=True
        )
        self._thread.start()

    def _read_ahead(self, stop: threading.Event, out: queue.Queue) -> None:
        """The thread: batches (with the position after each) into `out` until `stop` is set."""
        while not stop.is_set():
            try:
                x, y = self.loader.next_batch()
                # From pinned memory a non_blocking copy to the GPU is a DMA queued on the stream, and
                # the host goes on launching kernels (PyTorch's "pin_memory" notes).
                if self.pin_memory:
                    x, y = x.pin_memory(), y.pin_memory()
                item: Any = (x, y, (self.loader.epoch, self.loader.cursor))
            except BaseException as e:  # handed to the caller, who raises it in the main thread
                item = _Failure(e)
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_SECONDS)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), exactly what `loader.next_batch()` would return now. An error the thread met
        reading it (a damaged shard) is raised here."""
        if self._thread is None:
            self._start()
        assert self._thread is not None
        while True:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive():  # cannot happen unless the thread itself was killed
                    self.close()
                    raise RuntimeError("the batch prefetching thread stopped without a batch or an error") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        x, y, self._position = item
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the thread and drop the batches read ahead; the next `next_batch` call starts again from
        the position of the last batch handed out. Safe to call more than once."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._queue = queue.Queue(maxsize=self.depth)
        # The thread read past the position handed out: wind the inner loader back to it.
        self.loader.load_state_dict(self.state_dict())

    def __enter__(self) -> PrefetchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """`ShardLoader.state_dict()` at the position of the last batch handed out (see ShardLoader)."""
        # The identity fields never change; epoch and cursor are the thread's to move, so they come
        # from the snapshot taken with the last batch handed out.
        state = self.loader.state_dict()
        state["epoch"], state["cursor"] = self._position
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the batches read ahead are dropped."""
        self.close()
        self.loader.load_state_dict(state)
        self._position = (self.loader.epoch, self.loader.cursor)
