"""Tokenizing the piece stream, in order, on worker processes.

Pieces (see sources/base.py) are grouped into *tasks* of about `task_chars` characters. The grouping depends
only on the piece stream, so task k is the same text in every run: `gpt2lab prepare` records task
numbers to resume from, and 1 or N workers produce the same tokens. Results come back in task order.
Chat data (conversations.py) comes back as tokens and a loss mask, rendered by the chat template.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..chat import ChatTemplate
from .conversations import render_pieces
from .sources import Piece


def encode_pieces(encoding: Any, eot: int, pieces: list[tuple[str, bool]]) -> np.ndarray:
    """Tokens of `pieces` (text, starts_document) with EOT before each document: uint16, shape (n,).

    `encoding` is a tiktoken Encoding. Text that spells a special token ("<|endoftext|>") is encoded as
    ordinary text, so a corpus can never inject a document separator.
    """
    eot_array = np.array([eot], dtype=np.uint16)
    arrays = []
    for text, starts in pieces:
        if starts:
            arrays.append(eot_array)
        if text:
            if hasattr(encoding, "encode_to_numpy"):  # tiktoken >= 0.8: no Python list in between
                ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            else:
                ids = encoding.encode_ordinary(text)
            arrays.append(np.asarray(ids).astype(np.uint16))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


@dataclass
class Task:
    index: int
    pieces: list[tuple[str, bool]]
    progress: int  # source progress units (bytes, documents) the task covers
    documents: int
    # The source's stream position (Source.position()) before the task's first piece and after its last
    # one; None where the source keeps none.
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None


def make_tasks(
    pieces: Iterable[Piece],
    task_chars: int,
    position: Callable[[], dict[str, Any] | None] = lambda: None,
    first_index: int = 0,
) -> Iterator[Task]:
    """Group pieces into tasks of about `task_chars` characters, at places fixed by the piece stream.

    `position()` is asked for the source's position between pieces, when a task is complete. Nothing
    carries over from one task to the next, so a piece stream restarted at task k's first piece (a
    source seeked to `task.start`) with `first_index=k` gives task k and the ones after unchanged.
    """
    batch: list[tuple[str, bool]] = []
    chars = progress = documents = 0
    index, start = first_index, position()
    for text, starts, advance in pieces:
        progress += advance
        if text or starts:
            batch.append((text, starts))
            chars += len(text)
            documents += starts
        if chars >= task_chars:
            end = position()
            yield Task(index, batch, progress, documents, start, end)
            batch, chars, progress, documents, index, start = [], 0, 0, 0, index + 1, end
    if batch or progress:
        yield Task(index, batch, progress, documents, start, position())


_worker_encoding: Any = None
_worker_eot = 0
_worker_template: ChatTemplate | None = None


def _exit_when_orphaned(parent: int) -> None:
    # A worker waiting for a task never sees its parent die (sibling workers keep the task pipe open),
    # so after a SIGKILL of `gpt2lab prepare` it would wait forever.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(encoding: Any, eot: int, template: ChatTemplate | None = None) -> None:
    global _worker_encoding, _worker_eot, _worker_template
    _worker_encoding, _worker_eot, _worker_template = encoding, eot, template
    # Ctrl-C goes to the whole process group; the parent alone handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _encode_task(pieces: list[tuple[str, bool]]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A task's tokens (text), or its tokens and loss mask (chat)."""
    if _worker_template is not None:
        return render_pieces(_worker_encoding, _worker_template, pieces)
    return encode_pieces(_worker_encoding, _worker_eot, pieces)


def _with_mask(result: np.ndarray | tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    return result if isinstance(result, tuple) else (result, None)


def tokenize_tasks(
    tasks: Iterable[Task],
    encoding: Any,
    eot: int,
    workers: int,
    first_task: int = 0,
    skipped: Callable[[Task], None] = lambda task: None,
    template: ChatTemplate | None = None,
) -> Iterator[tuple[Task, np.ndarray, np.ndarray | None]]:
    """(task, tokens, mask) in task order, for tasks from `first_task` on; earlier ones go to
    `skipped(task)` untokenized (a resumed run reads them only to reach its starting point). With a chat
    `template` the pieces are conversations and `mask` is their loss mask (uint8, shape as tokens);
    otherwise it is None.

    workers == 1 tokenizes in this process. With more, at most 2 * workers + 2 tasks are in flight, so
    memory stays bounded (Pool.imap would read the whole corpus into its queue). Close the generator to
    stop the pool early.
    """
    todo = _starting_at(tasks, first_task, skipped)
    if workers == 1:
        for task in todo:
            if template is not None:
                yield task, *render_pieces(encoding, template, task.pieces)
            else:
                yield task, encode_pieces(encoding, eot, task.pieces), None
        return
    pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(encoding, eot, template))
    try:
        in_flight: deque = deque()
        for task in todo:
            in_flight.append((task, pool.apply_async(_encode_task, (task.pieces,))))
            if len(in_flight) >= 2 * workers + 2:
                done, result = in_flight.popleft()
                yield done, *_with_mask(result.get())
        while in_flight:
            done, result = in_flight.popleft()
            yield done, *_with_mask(result.get())
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _starting_at(tasks: Iterable[Task], first_task: int, skipped: Callable[[Task], None]) -> Iterator[Task]:
    for task in tasks:
        if task.index < first_task:
            skipped(task)
        else:
            yield task
