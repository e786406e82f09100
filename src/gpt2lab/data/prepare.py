"""Corpus -> token shards: stream a source, tokenize on worker processes, write llm.c shards, resume.

The stream is the corpus's documents in order, each preceded by `<|endoftext|>` (as build-nanogpt's
fineweb.py does), cut into chunks of `shard_tokens` tokens at fixed stream positions: the shards depend
on the token stream only, never on the number of workers or on where an earlier run was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..chat import ChatTemplate
from ..errors import GPT2LabError
from ..fileio import atomic_write_json, fsync_dir
from ..tokenizer import Tokenizer, copy_tokenizer_files, get_tokenizer
from . import outdir
from . import shards as fmt
from .conversations import add_chat_keys, is_chat
from .encode import Task, make_tasks, tokenize_tasks
from .sources import DEFAULT_PIECE_CHARS, Source, resolve_source

DEFAULT_SHARD_TOKENS = 100_000_000
# With --val-tokens left at auto, val is min(shard_tokens, total // AUTO_VAL_DIVISOR) tokens: one shard
# for a large corpus (like llm.c's fineweb_val_000000.bin), 10% for a small one.
AUTO_VAL_DIVISOR = 10
# How documents are cut into pieces (text.DocumentPieces), which fixes the task numbers a progress
# record resumes from. 2: cuts inside runs with no whitespace (issue 11). A record made with another
# rule is started again rather than resumed.
PIECES_VERSION = 2


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `gpt2lab prepare` takes. None means "the preset's value, else the default".

    `piece_chars` is the size of the text pieces and tokenization tasks; it is part of a run's
    identity because resume points are counted in tasks. `data_format` is "text", "chat" (records
    with a 'messages' list, rendered by the chat template with a loss mask) or "auto" (chat when
    the records have a 'messages' field and no `text_field` is given).
    """

    source: str
    out: str | os.PathLike
    text_field: str | None = None
    split_on: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None
    name: str | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int | None = None  # None: auto
    workers: int | None = None  # None: CPU count
    overwrite: bool = False
    progress: bool = True
    piece_chars: int = DEFAULT_PIECE_CHARS
    tokenizer: str | None = None  # a directory made by `gpt2lab tokenizer train`; None: GPT-2's
    ext: tuple[str, ...] | None = None  # file suffixes a directory or glob is restricted to; None: all
    data_format: str = "auto"

    def command(self) -> str:
        """The `gpt2lab prepare` command that makes these shards (options that change no byte left out)."""
        args = ["gpt2lab", "prepare", self.source, "--out", str(self.out)]
        for flag, value in (
            ("--text-field", self.text_field),
            ("--split-on", self.split_on.encode("unicode_escape").decode() if self.split_on else None),
            ("--hf-config", self.hf_config),
            ("--split", self.hf_split),
            ("--name", self.name),
            ("--val-tokens", self.val_tokens),
            ("--tokenizer", self.tokenizer),
            ("--ext", ",".join(self.ext) if self.ext is not None else None),
            ("--format", self.data_format if self.data_format != "auto" else None),
        ):
            if value is not None:
                args += [flag, str(value)]
        if self.shard_tokens != DEFAULT_SHARD_TOKENS:
            args += ["--shard-tokens", str(self.shard_tokens)]
        return shlex.join(args)


@dataclass
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    up_to_date: bool = False  # the directory was already complete: nothing was done
    resumed_chunks: int = 0  # chunks an earlier, interrupted run had completed
    tokenized: int = 0  # tokens tokenized by this run
    seconds: float = 0.0


def default_workers() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check(options: PrepareOptions, tok: Tokenizer) -> None:
    if not 1 <= options.shard_tokens <= fmt.MAX_SHARD_TOKENS:
        raise GPT2LabError(f"--shard-tokens must be between 1 and {fmt.MAX_SHARD_TOKENS}, got {options.shard_tokens}")
    if options.val_tokens is not None and options.val_tokens < 0:
        raise GPT2LabError(f"--val-tokens must be >= 0, got {options.val_tokens}")
    if options.workers is not None and options.workers < 1:
        raise GPT2LabError(f"--workers must be at least 1, got {options.workers}")
    if options.name is not None and (not options.name or "/" in options.name or options.name.startswith(".")):
        raise GPT2LabError(f"--name must be a plain file name prefix, got {options.name!r}")
    if options.split_on == "":
        raise GPT2LabError("--split-on must not be empty")
    if options.piece_chars < 1:
        raise ValueError(f"piece_chars must be at least 1, got {options.piece_chars}")
    if tok.n_vocab > 1 << 16:
        raise GPT2LabError(f"tokenizer {tok.name!r} has {tok.n_vocab} tokens; uint16 shards hold at most 65536")


def _print_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def prepare(
    options: PrepareOptions, tokenizer: Tokenizer | None = None, note: Callable[[str], None] = _print_note
) -> PrepareResult:
    """Tokenize `options.source` into shards and a manifest in `options.out`.

    The stream's first `val_tokens` tokens are the val split, the rest train; the one chunk across the
    boundary is written whole under a `_pending_` name and split at the end (docs/formats.md has the
    naming). manifest.json is written last. Re-running with the same options finishes an interrupted run
    or, if the directory is complete, checks it and does nothing. `note(line)` is told how a resume
    proceeds where it must read the source again from the start. Raises GPT2LabError for bad input.
    """
    started = time.perf_counter()
    tok = tokenizer or get_tokenizer(options.tokenizer)
    _check(options, tok)
    source = resolve_source(
        options.source,
        text_field=options.text_field,
        split_on=options.split_on,
        hf_config=options.hf_config,
        hf_split=options.hf_split,
        piece_chars=options.piece_chars,
        ext=options.ext,
    )
    source.open()
    fields = None if options.data_format == "text" else source.record_fields()
    source.chat = is_chat(options.data_format, options.text_field, fields, options.source)
    template = ChatTemplate.for_tokenizer(tok) if source.chat else None
    if template is not None and template.n_vocab > 1 << 16:
        raise GPT2LabError(f"tokenizer {tok.name!r} with the 4 chat tokens has {template.n_vocab}; uint16 holds 65536")
    identity = {
        "source": source.describe(),
        "tokenizer": {"name": tok.name, "vocab_hash": tok.vocab_hash, "eot_token": tok.eot_token},
        "settings": {
            "shard_prefix": options.name or source.shard_prefix,
            "shard_tokens": options.shard_tokens,
            "val_tokens": "auto" if options.val_tokens is None else options.val_tokens,
            "piece_chars": options.piece_chars,
        },
    }
    if template is not None:  # only for chat data, so that text directories keep their fingerprints
        identity["settings"]["format"] = "chat"
        identity["chat_template"] = template.to_record()
    # Same fingerprint = same output: identity plus the input files' sizes and times.
    fingerprint = hashlib.sha256(
        json.dumps({**identity, "input": source.signature(), "format": fmt.MANIFEST_VERSION}).encode()
    ).hexdigest()
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise GPT2LabError(f"--out {out} is a file; give a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with outdir.locked(out):
            result = _run(source, options, tok, out, identity, fingerprint, note)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if this run left it empty
        raise
    result.seconds = time.perf_counter() - started
    return result


def _run(
    source: Source,
    options: PrepareOptions,
    tok: Tokenizer,
    out: Path,
    identity: dict,
    fingerprint: str,
    note: Callable[[str], None],
) -> PrepareResult:
    outdir.remove_files([p for p in out.glob(".*.tmp-*") if p.is_file()])  # left by a killed run
    action, record = outdir.claim(out, fingerprint, identity, tok, options.overwrite)
    if action == "done":
        assert record is not None
        if _complete(out, record, options.overwrite):
            return PrepareResult(out, record, up_to_date=True)
        action, record = "fresh", None
    if action == "resume" and record is not None and record.get("pieces") != PIECES_VERSION and record["end"] is None:
        if record.get("chunks"):
            note("the interrupted run was made by an older gpt2lab, which cuts documents differently: starting again")
            outdir.remove_files([path for c in record["chunks"] for path in outdir.files_of(out, c["shard"])])
        action = "fresh"
    if action == "resume":
        assert record is not None
        progress = record
        recorded = progress.get("chunks", [])
        progress["chunks"] = outdir.valid_prefix(out, recorded)
        if len(progress["chunks"]) < len(recorded):  # a damaged file: rebuild from there
            progress["end"] = None
    else:
        progress = {"fingerprint": fingerprint, **identity, "pieces": PIECES_VERSION, "chunks": [], "end": None}
        atomic_write_json(out / outdir.PROGRESS_NAME, progress)
    # The directory carries the tokenizer it is made with; data_tokenizer() reads it back.
    tok_dir = out / fmt.TOKENIZER_SUBDIR
    if tok.path is None:
        shutil.rmtree(tok_dir, ignore_errors=True)
    else:
        copy_tokenizer_files(tok, tok_dir)
    resumed = len(progress["chunks"])
    tokenized = 0
    if progress["end"] is None:
        tokenized = _stream(source, options, tok, out, progress, note)
    manifest = _finalize(out, options, progress)
    return PrepareResult(out, manifest, resumed_chunks=resumed, tokenized=tokenized)


def _complete(out: Path, manifest: dict, overwrite: bool) -> bool:
    """Whether the finished directory `out` is intact (its listed files present, whole); a damaged one is
    an error, or with `overwrite` is cleared to be made again."""
    try:
        outdir.verify_listed_shards(out, manifest)
    except GPT2LabError:
        if not overwrite:
            raise
        outdir.remove_files([*(out / name for name in outdir.listed_files(manifest)), out / fmt.MANIFEST_NAME])
        return False
    leftover = outdir.read_json(out / outdir.PROGRESS_NAME)
    if leftover:  # killed after the manifest was written, before the clean-up
        pending = [c["shard"] for c in leftover["chunks"] if c["shard"]["split"] == "pending"]
        outdir.remove_files([path for shard in pending for path in outdir.files_of(out, shard)])
        outdir.remove_files([out / outdir.PROGRESS_NAME])
    return True


def _resume_point(source: Source, progress: dict, note: Callable[[str], None]) -> tuple[int, int, int, bool]:
    """(first task, its stream position, documents before it, whether the source was seeked there).

    Each completed chunk is recorded with the task where the next one starts and, where the source keeps
    one (a Hugging Face dataset's `state_dict()`), the stream position there. Seeked, nothing before it
    is read again but the rest of one source shard (`datasets` restarts a shard and skips to the
    example); otherwise the source is read from its start, tokenized only from that task on. Either way
    the files are byte-identical to an uninterrupted run's.
    """
    if not progress["chunks"]:
        return 0, 0, 0, False
    last = progress["chunks"][-1]
    first_task, task_start = last["resume_task"], last["resume_task_start"]
    position, why = last.get("resume_position"), source.position_unsupported()
    if why is None:
        if position is None:
            why = "the interrupted run recorded no stream position"
        else:
            try:
                source.seek(position)
                return first_task, task_start, last["resume_documents"], True
            except ValueError as e:  # e.g. another version of the dataset library wrote it
                why = f"cannot restore the recorded stream position ({e})"
    if why:
        note(f"{why}: reading the source again from its start to the resume point (without tokenizing it)")
    return first_task, task_start, 0, False


def _stream(
    source: Source, options: PrepareOptions, tok: Tokenizer, out: Path, progress: dict, note: Callable[[str], None]
) -> int:
    """Tokenize from the resume point to the end of the source into chunks; returns tokens made."""
    from tqdm.auto import tqdm

    template = ChatTemplate.from_record(progress["chat_template"], str(out)) if progress.get("chat_template") else None
    chunks = outdir.ChunkWriter(
        out,
        progress["settings"]["shard_prefix"],
        options.shard_tokens,
        options.val_tokens,
        progress,
        template is not None,
    )
    first_task, task_start, documents, seeked = _resume_point(source, progress, note)
    tic = time.perf_counter()
    made = 0
    bar: Any = None

    def show(task: Task) -> None:
        nonlocal documents, bar
        if bar is None:  # made once the worker pool exists: fork before tqdm starts its monitor thread
            bar = tqdm(
                total=source.progress_total,
                unit=source.progress_unit,
                unit_scale=True,
                unit_divisor=1024 if source.progress_unit == "B" else 1000,
                desc="prepare",
                disable=not options.progress,
                file=sys.stderr,
                mininterval=0.5,
                dynamic_ncols=True,
                initial=source.progress_done,
            )
        documents += task.documents
        bar.update(task.progress)
        rate = made / max(time.perf_counter() - tic, 1e-9)
        bar.set_postfix_str(f"{documents:,} docs, {task_start:,} tokens, {rate:,.0f} tok/s", refresh=False)

    workers = options.workers or default_workers()
    # A seeked source starts at the first task's first piece; otherwise tasks before it are skipped.
    tasks = make_tasks(source.pieces(), options.piece_chars, source.position, first_task if seeked else 0)
    stream = tokenize_tasks(tasks, tok.encoding, tok.eot_token, workers, first_task, skipped=show, template=template)
    try:
        for task, tokens, mask in stream:
            chunks.feed(tokens, task, task_start, documents, mask)
            task_start += len(tokens)
            made += len(tokens)
            show(task)
        chunks.finish(_end_record(source, options.source, task_start, documents))
    except BaseException:
        chunks.abort()
        if task_start == 0 and not progress["chunks"]:
            outdir.remove_files([out / outdir.PROGRESS_NAME])  # nothing was written: leave no trace
        raise
    finally:
        stream.close()  # stops the worker pool now, also on an error
        if bar is not None:
            bar.close()
    return made


def _template(progress: dict, out: Path) -> ChatTemplate | None:
    """The chat template a run renders conversations with (its progress record has it), or None for text."""
    record = progress.get("chat_template")
    return ChatTemplate.from_record(record, str(out / outdir.PROGRESS_NAME)) if record else None


def _end_record(source: Source, spec: str, tokens: int, documents: int) -> dict[str, Any]:
    """The totals of a finished stream (`documents` counted over skipped tasks too), or a GPT2LabError
    for a corpus that gave no tokens."""
    stats, skipped = source.stats, source.skipped_records
    if tokens == 0 and source.chat and skipped.count:
        raise GPT2LabError(
            f"{spec}: no conversation to train on: all {skipped.count} record(s) were skipped (first: "
            f"{skipped.examples[0]}); each record needs a 'messages' list with an assistant reply"
        )
    if tokens == 0:
        empty = f" ({stats.empty_documents} empty documents)" if stats.empty_documents else ""
        raise GPT2LabError(f"{spec}: empty corpus: there is no text in it{empty}")
    end = {
        "tokens": tokens,
        "documents": documents,
        "empty_documents": stats.empty_documents,
        "replaced_bytes": stats.replaced_bytes,
        "files_with_replacements": len(stats.files_with_replacements),
        "example_files_with_replacements": stats.files_with_replacements[:10],
    }
    if source.chat:
        end["skipped_records"] = skipped.to_json()
    return end


def _finalize(out: Path, options: PrepareOptions, progress: dict) -> dict[str, Any]:
    """Split the pending chunk at the val/train boundary, write manifest.json, remove the progress file."""
    end, settings = progress["end"], progress["settings"]
    total, size = end["tokens"], options.shard_tokens
    val = options.val_tokens if options.val_tokens is not None else min(size, total // AUTO_VAL_DIVISOR)
    if val >= total:
        # Nothing here is worth keeping: a re-run needs other settings anyway.
        listed = [path for c in progress["chunks"] for path in outdir.files_of(out, c["shard"])]
        outdir.remove_files([*listed, out / outdir.PROGRESS_NAME])
        raise GPT2LabError(
            f"--val-tokens {val} leaves no training tokens: the corpus has {total}; use a smaller --val-tokens"
        )
    shard_list: list[fmt.ShardInfo] = []
    pending: list[Path] = []
    for chunk in progress["chunks"]:
        info = fmt.ShardInfo(**chunk["shard"])
        if info.split != "pending":
            shard_list.append(info)
            continue
        pending += outdir.files_of(out, chunk["shard"])
        n_val = min(max(val - chunk["index"] * size, 0), info.tokens)
        val_part, train_part = (
            (out / outdir.shard_name(settings["shard_prefix"], split, chunk["index"]), split)
            for split in ("val", "train")
        )
        shard_list += outdir.split_shard(out / info.file, n_val, val_part, train_part, mask=info.mask is not None)
    splits = {
        split: {
            "tokens": sum(s.tokens for s in shard_list if s.split == split),
            "shards": sum(1 for s in shard_list if s.split == split),
        }
        for split in ("train", "val")
    }
    manifest = {
        "format": fmt.MANIFEST_FORMAT,
        "format_version": fmt.MANIFEST_VERSION,
        "shard_format": {
            "magic": fmt.MAGIC,
            "version": fmt.VERSION,
            "header_bytes": fmt.HEADER_BYTES,
            "token_dtype": "uint16",
        },
        "source": progress["source"],
        "tokenizer": progress["tokenizer"],
        "documents_begin_with_eot": True,
        "total_tokens": total,
        "val_tokens": val,
        "splits": splits,
        "shards": [s.to_json() for s in shard_list],
        "documents": end["documents"],
        "empty_documents_skipped": end["empty_documents"],
        "replaced_bytes": end["replaced_bytes"],
        "files_with_replacements": end["files_with_replacements"],
        "example_files_with_replacements": end["example_files_with_replacements"],
        "settings": settings,
        "fingerprint": progress["fingerprint"],
        "command": options.command(),
        "gpt2lab_version": __version__,
    }
    if progress.get("chat_template"):
        add_chat_keys(manifest, _template(progress, out), end["skipped_records"])
    atomic_write_json(out / fmt.MANIFEST_NAME, manifest)
    outdir.remove_files([*pending, out / outdir.PROGRESS_NAME])
    fsync_dir(out)
    return manifest
