"""`gpt2lab prepare`'s output directory: chunk files, the progress record, and whose directory it is.

While a run is in progress the directory holds `prepare-progress.json`: the run's identity (source,
tokenizer, settings, fingerprint) and every completed chunk with where a re-run resumes: the task
(and its first token's stream position), the documents before it, and, for a source that keeps one,
the source's stream position at that task's first piece. Each chunk file and each update of the
record is written atomically, so after a kill at any instant the record lists only complete files.
`manifest.json` replaces the record when the run completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GPT2LabError
from ..fileio import atomic_write_json
from ..tokenizer import Tokenizer
from . import shards as fmt
from .encode import Task

PROGRESS_NAME = "prepare-progress.json"
LOCK_NAME = ".prepare.lock"
COPY_BLOCK = 1 << 22  # tokens copied at a time when the pending chunk is split


def shard_name(prefix: str, split: str, index: int) -> str:
    """llm.c's naming: edu_fineweb_val_000000.bin, edu_fineweb_train_000001.bin, ..."""
    return f"{prefix}_{split}_{index:06d}.bin"


def files_of(out: Path, shard: dict[str, Any]) -> list[Path]:
    """A shard entry's files in `out`: the shard and, for chat data, its mask file."""
    return [out / shard["file"], *([out / shard["mask"]] if shard.get("mask") else [])]


def chunk_split(index: int, shard_tokens: int, val_tokens: int | None) -> str:
    """The split chunk `index` belongs to, or "pending" if it straddles the (maybe not yet known) val
    boundary. `val_tokens` None means auto, which is at most one shard: only chunk 0 can straddle."""
    if val_tokens is None:
        return "pending" if index == 0 else "train"
    lo, hi = index * shard_tokens, (index + 1) * shard_tokens
    if hi <= val_tokens:
        return "val"
    return "train" if lo >= val_tokens else "pending"


@dataclass(frozen=True)
class Resume:
    """Where a re-run starts after a chunk: task `task` (-1: none, the stream is done), whose first
    token is at stream position `task_start`, after `documents` documents; `position` is the source's
    stream position at that task's first piece (Source.position()), or None."""

    task: int
    task_start: int
    documents: int
    position: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "resume_task": self.task,
            "resume_task_start": self.task_start,
            "resume_documents": self.documents,
        }
        if self.position is not None:
            try:  # a stream state is the dataset library's; keep it only if it is JSON
                json.dumps(self.position)
                out["resume_position"] = self.position
            except (TypeError, ValueError):
                pass
        return out


class ChunkWriter:
    """Cuts the token stream into chunks of `shard_tokens` at fixed stream positions, writes each as a
    shard (and, for chat data, its loss mask beside it), and records it in the progress file with where
    a re-run must start tokenizing."""

    def __init__(
        self, out: Path, prefix: str, shard_tokens: int, val_tokens: int | None, progress: dict, chat: bool = False
    ) -> None:
        self.out, self.prefix, self.size, self.val_tokens = out, prefix, shard_tokens, val_tokens
        self.progress = progress
        self.index = len(progress["chunks"])
        self.pos = self.index * shard_tokens  # stream position of the next token to write
        self.writer: fmt.ShardWriter | None = None
        self.chat = chat
        self.mask_writer: fmt.MaskWriter | None = None
        self.learned = 0  # mask values that are 1 in the chunk being written

    def feed(
        self, tokens: np.ndarray, task: Task, task_start: int, documents: int, mask: np.ndarray | None = None
    ) -> None:
        """Append `task`'s tokens (uint16, shape (n,)) and, for chat data, their loss mask (uint8, shape
        (n,)); they start at stream position `task_start`, after `documents` documents."""
        off = self.pos - task_start  # > 0 only for the first task after a resume
        while off < len(tokens):
            if self.writer is None:
                split = chunk_split(self.index, self.size, self.val_tokens)
                path = self.out / shard_name(self.prefix, split, self.index)
                self.writer = fmt.ShardWriter(path, split)
                if self.chat:
                    self.mask_writer, self.learned = fmt.MaskWriter(path.with_suffix(fmt.MASK_SUFFIX)), 0
            take = min(self.size - self.writer.tokens, len(tokens) - off)
            self.writer.write(tokens[off : off + take])
            if self.mask_writer is not None:
                assert mask is not None
                self.mask_writer.write(mask[off : off + take])
                self.learned += int(np.count_nonzero(mask[off : off + take]))
            off += take
            self.pos += take
            if self.writer.tokens == self.size:
                # The next chunk starts inside this task, or at the next one.
                if off == len(tokens):
                    resume = Resume(task.index + 1, task_start + len(tokens), documents + task.documents, task.end)
                else:
                    resume = Resume(task.index, task_start, documents, task.start)
                self._close(resume)
                atomic_write_json(self.out / PROGRESS_NAME, self.progress)

    def _close(self, resume: Resume) -> None:
        assert self.writer is not None
        info = self.writer.close()
        self.writer = None
        if self.mask_writer is not None:
            name, sha = self.mask_writer.close()
            self.mask_writer = None
            info = dataclasses.replace(info, mask=name, mask_sha256=sha, learned_tokens=self.learned)
        self.progress["chunks"].append({"index": self.index, "shard": info.to_json(), **resume.to_json()})
        self.index += 1

    def finish(self, end: dict[str, Any]) -> None:
        """The stream has ended: record the last, partial chunk together with the totals, in one write
        (a last chunk recorded without them would leave a re-run nowhere to resume from)."""
        if self.writer is not None:
            self._close(Resume(-1, self.pos, end["documents"], None))
        self.progress["end"] = end
        atomic_write_json(self.out / PROGRESS_NAME, self.progress)

    def abort(self) -> None:
        """Drop the chunk being written (its temp file goes; the finished ones stay for a re-run)."""
        if self.writer is not None:
            self.writer.discard()
            self.writer = None
        if self.mask_writer is not None:
            self.mask_writer.discard()
            self.mask_writer = None


def split_shard(
    src: Path, n_first: int, first: tuple[Path, str], rest: tuple[Path, str], mask: bool = False
) -> list[fmt.ShardInfo]:
    """Copy shard `src` into two shards, (path, split) `first` with its first `n_first` tokens and `rest`
    with the others; an empty part is not written. With `mask`, the mask file beside `src` is split the
    same way. Reads a block at a time: memory stays small."""
    total = fmt.read_header(src)
    src_mask = src.with_suffix(fmt.MASK_SUFFIX)
    if mask and fmt.read_header(src_mask, kind="mask") != total:
        raise GPT2LabError(f"{src_mask} does not match {src.name}; {fmt.REBUILD_HINT}")
    infos = []
    with open(src, "rb") as f, open(src_mask if mask else os.devnull, "rb") as m:
        f.seek(fmt.HEADER_BYTES)
        m.seek(fmt.HEADER_BYTES if mask else 0)
        for (path, split), n in ((first, n_first), (rest, total - n_first)):
            if n == 0:
                continue
            with fmt.ShardWriter(path, split) as writer:
                _copy(f, writer, n)
                info = writer.close()
            if mask:
                with fmt.MaskWriter(path.with_suffix(fmt.MASK_SUFFIX)) as mask_writer:
                    learned = _copy(m, mask_writer, n)
                    name, sha = mask_writer.close()
                info = dataclasses.replace(info, mask=name, mask_sha256=sha, learned_tokens=learned)
            infos.append(info)
    return infos


def _copy(f: Any, writer: fmt.ShardWriter, n: int) -> int:
    """Copy `n` values from file `f` into `writer`, a block at a time; their sum (learned tokens, for a mask)."""
    total = 0
    while writer.tokens < n:
        block = np.fromfile(f, dtype=writer.dtype, count=min(n - writer.tokens, COPY_BLOCK))
        assert len(block), f"{f.name} ended early"  # read_header checked the size
        writer.write(block)
        total += int(block.sum(dtype=np.int64))
    return total


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def listed_files(record: dict[str, Any]) -> list[str]:
    """Shard file names a manifest or progress record lists."""
    entries = [*record.get("shards", []), *(c["shard"] for c in record.get("chunks", []))]
    return [name for s in entries for name in (s["file"], s.get("mask")) if name]


def _difference(record: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between an earlier run's record and this run, in words."""
    for key in ("source", "settings"):
        theirs, ours = record.get(key) or {}, identity[key]
        for name in sorted(set(theirs) | set(ours)):
            if theirs.get(name) != ours.get(name):
                return f"{key} {name} {theirs.get(name)!r} there, {ours.get(name)!r} now"
    return "the input files changed since (size or modification time)"


def claim(
    out: Path, fingerprint: str, identity: dict[str, Any], tok: Tokenizer, overwrite: bool
) -> tuple[str, dict[str, Any] | None]:
    """Decide what to do with `out`: ("done", manifest), ("resume", progress) or ("fresh", None).

    A directory holding another corpus, other settings or another tokenizer's shards (or anything
    else) is refused unless `overwrite`; then the files its manifest or progress record lists are
    deleted first, and unrelated files are left alone.
    """
    manifest_path, progress_path = out / fmt.MANIFEST_NAME, out / PROGRESS_NAME
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    progress = read_json(progress_path) if progress_path.exists() else None
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        return "done", manifest
    if not manifest_path.exists() and progress is not None and progress.get("fingerprint") == fingerprint:
        return "resume", progress
    ours = {fmt.MANIFEST_NAME, PROGRESS_NAME, LOCK_NAME}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and ".tmp-" not in p.name)
    if not manifest_path.exists() and not progress_path.exists() and not others:
        return "fresh", None
    if not overwrite:
        record = manifest or progress
        made_with = (record or {}).get("tokenizer") or {}
        if record is not None and made_with.get("vocab_hash") != tok.vocab_hash:
            what = (
                f"holds shards made with another tokenizer ({made_with.get('name')!r}, vocab hash "
                f"{str(made_with.get('vocab_hash'))[:12]}…; this one is {tok.name!r}, {tok.vocab_hash[:12]}…)"
            )
        elif record is not None:
            what = f"holds shards of another corpus or other settings ({_difference(record, identity)})"
        elif manifest_path.exists() or progress_path.exists():
            what = f"has an unreadable {fmt.MANIFEST_NAME if manifest_path.exists() else PROGRESS_NAME}"
        else:
            what = f"is not empty (it has {others[0]}{' and more' if len(others) > 1 else ''})"
        raise GPT2LabError(f"{out} {what}; pass --overwrite to replace them, or choose another --out")
    remove_files([out / name for record in (manifest, progress) if record for name in listed_files(record)])
    remove_files([manifest_path, progress_path])
    return "fresh", None


def valid_prefix(out: Path, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded chunks whose files are intact (header and size), up to the first damaged one."""
    good = []
    for chunk in chunks:
        shard = chunk["shard"]
        try:
            if fmt.read_header(out / shard["file"]) != shard["tokens"]:
                break
            if shard.get("mask") and fmt.read_header(out / shard["mask"], kind="mask") != shard["tokens"]:
                break
        except GPT2LabError:
            break
        good.append(chunk)
    return good


def verify_listed_shards(out: Path, manifest: dict[str, Any]) -> None:
    """Check every shard the manifest lists is present with a valid header and the listed size."""
    hint = "run this command again with --overwrite to rebuild the shards"
    for shard in manifest["shards"]:
        path = out / shard["file"]
        if not path.is_file():
            raise GPT2LabError(f"{path} is listed in the manifest but missing; {hint}")
        n = fmt.read_header(path, hint)
        if n != shard["tokens"]:
            raise GPT2LabError(f"{path} holds {n} tokens but the manifest lists {shard['tokens']}; {hint}")
        if shard.get("mask"):
            mask_path = out / shard["mask"]
            if not mask_path.is_file():
                raise GPT2LabError(f"{mask_path} is listed in the manifest but missing; {hint}")
            if fmt.read_header(mask_path, hint, kind="mask") != n:
                raise GPT2LabError(f"{mask_path} does not hold one mask value per token of {path.name}; {hint}")


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Keep two `gpt2lab prepare` runs from writing one directory at once.

    A POSIX record lock (lockf) belongs to this process alone: forked tokenizer workers do not hold it
    (as they would an flock), and the OS drops it the moment the process dies, even by SIGKILL, so a
    re-run can start at once. Where there is no fcntl module, there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = out / LOCK_NAME
    with open(lock_path, "w") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise GPT2LabError(f"another 'gpt2lab prepare' is writing {out}; wait for it to finish") from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
