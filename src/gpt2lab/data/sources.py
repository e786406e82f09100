"""Where documents come from: local text / JSONL / Parquet files, Hugging Face datasets, named presets.

Every source yields its documents as pieces of bounded size, cut where GPT-2's pre-tokenizer splits
anyway (text.safe_cut): memory stays bounded, pieces tokenize in parallel, and their tokens are exactly
the whole document's.
"""

from __future__ import annotations

import abc
import codecs
import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..download import cache_dir, load_hf_dataset
from ..errors import GPT2LabError
from ..fileio import atomic_open, file_sha256
from ..jsonl import read_jsonl
from .conversations import MESSAGES_FIELD, SkippedRecords, conversation_pieces
from .text import DocumentPieces, Utf8Decoder

# (text, starts_document, progress), in a fixed order: a document is one or more consecutive pieces of
# about `piece_chars` characters, the first with starts_document true; progress is how far through the
# input the piece brings the stream, in the source's `progress_unit`, for the progress bar.
Piece = tuple[str, bool, int]

TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DEFAULT_PIECE_CHARS = 1 << 20
READ_BYTES = 1 << 20
# Where a NUL byte marks a file as binary, as git and grep decide it. UTF-8 text never holds one in
# practice, while nearly every binary format (images, archives, object files) does near its start.
SNIFF_BYTES = 8192
EXAMPLE_FILES = 10  # skipped / damaged files named in the manifest
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class CorpusPreset:
    """A named corpus: a public text shipped gzipped inside the package, or a Hugging Face dataset.

    `url` and `sha256` say where a bundled text comes from and what it must decompress to.
    """

    name: str
    shard_prefix: str
    description: str
    url: str | None = None
    sha256: str | None = None
    bundled: str | None = None  # file name in the gpt2lab.data package
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"


CORPUS_PRESETS = {
    p.name: p
    for p in (
        CorpusPreset(
            "tinyshakespeare",
            "tinyshakespeare",
            "Tiny Shakespeare (karpathy/char-rnn), 1 MB, 338K GPT-2 tokens",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            bundled="tinyshakespeare.txt.gz",
        ),
        # The corpus build-nanogpt and llm.c train GPT-2 (124M) on; llm.c names its shards edu_fineweb_*.
        CorpusPreset(
            "fineweb-edu-10B",
            "edu_fineweb",
            "FineWeb-Edu sample-10BT (HuggingFaceFW/fineweb-edu), about 10B GPT-2 tokens",
            hf_dataset="HuggingFaceFW/fineweb-edu",
            hf_config="sample-10BT",
        ),
        CorpusPreset(
            "openwebtext",
            "openwebtext",
            "OpenWebText (Skylion007/openwebtext), about 9B GPT-2 tokens",
            hf_dataset="Skylion007/openwebtext",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceStats:
    empty_documents: int = 0
    replaced_bytes: int = 0
    files_with_replacements: list[str] = field(default_factory=list)


class Source(abc.ABC):
    """A corpus to read. `open()` checks it exists (raising GPT2LabError), `pieces()` streams it."""

    progress_unit = "B"

    def __init__(self, spec: str, shard_prefix: str, piece_chars: int) -> None:
        self.spec = spec
        self.shard_prefix = shard_prefix
        self.piece_chars = piece_chars
        self.stats = SourceStats()
        self.progress_total: int | None = None
        self.progress_done = 0  # progress before the start, after a seek()
        self.preset: CorpusPreset | None = None
        # Chat mode: records are conversations (their 'messages' field); bad ones are skipped and counted.
        self.chat = False
        self.skipped_records = SkippedRecords()

    @abc.abstractmethod
    def open(self) -> None:
        """Check the source can be read and learn its size; errors here come before any output."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON description for the manifest."""

    @abc.abstractmethod
    def signature(self) -> str:
        """A hash that changes when the input changes (file list, sizes, times; dataset identity)."""

    @abc.abstractmethod
    def record_fields(self) -> list[str] | None:
        """The fields of the source's first record, or None for plain text (not records)."""

    @abc.abstractmethod
    def pieces(self) -> Iterator[Piece]:
        """The corpus as pieces, in order; counts empty documents and replaced bytes into `stats`."""

    # Stream positions, for resuming without reading again what is done (`gpt2lab prepare`). A source
    # that can restore one overrides these three; the others are re-read from the start on resume.

    def position_unsupported(self) -> str | None:
        """None if `position()` and `seek()` work here; else why not, in words (for a note), or "" when
        re-reading from the start is cheap and not worth a note (local files)."""
        return ""

    def position(self) -> dict[str, Any] | None:
        """Where the stream stands between two pieces: a JSON object that `seek()` takes to make
        `pieces()` continue with the piece after the last one yielded (stats included)."""
        return None

    def seek(self, position: dict[str, Any]) -> None:
        """Make the next `pieces()` start at `position` (from `position()` of an earlier run)."""
        raise GPT2LabError(f"{type(self).__name__} cannot restore a stream position: it is read from the start")


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


class FileSource(Source):
    """Local files: one file, a directory (searched recursively, hidden entries skipped), or a glob.

    Text files are one document each unless `split_on` is given; JSONL and Parquet files give one
    document per record, from `text_field`. Files are read in sorted path order. In a directory or
    glob, a file without a known suffix (source code, a Makefile) is taken only if it is UTF-8 text, with
    no NUL byte in its first SNIFF_BYTES, else skipped and listed in `skipped`; `.txt` / `.md` files are
    always taken, undecodable bytes replaced and counted. `ext` (suffixes without the dot, lower case)
    keeps only the files with those suffixes.
    """

    def __init__(
        self,
        spec: str,
        shard_prefix: str,
        piece_chars: int,
        text_field: str = "text",
        split_on: str | None = None,
        ext: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(spec, shard_prefix, piece_chars)
        self.text_field = text_field
        self.split_on = split_on
        self.ext = ext
        self.files: list[Path] = []
        self.skipped: list[Path] = []  # not UTF-8 text

    def open(self) -> None:
        found, explicit = _find_files(self.spec, self.ext)
        if explicit:
            # A file named on its own is read whatever its suffix; only a binary one is refused.
            path = found[0]
            if _needs_sniffing(path) and _has_nul(path):
                raise GPT2LabError(
                    f"{path}: a binary file (it has a NUL byte in its first {SNIFF_BYTES} bytes), not text; "
                    "give text, JSONL or Parquet files"
                )
            self.files = found
        else:
            for path in found:
                (self.skipped if _needs_sniffing(path) and not _is_utf8_text(path) else self.files).append(path)
            if not self.files:
                raise GPT2LabError(
                    f"{self.spec}: none of its {len(found)} file(s) is UTF-8 text (first: {self.skipped[0]}); "
                    "point at text, JSONL or Parquet files"
                )
        self.progress_total = sum(f.stat().st_size for f in self.files)

    def describe(self) -> dict[str, Any]:
        kinds = sorted({_kind_of(f) for f in self.files})
        desc: dict[str, Any] = {
            "kind": "files",
            "path": self.spec,
            "files": len(self.files),
            "bytes": self.progress_total,
            "formats": kinds,
        }
        if "text" in kinds:
            desc["split_on"] = self.split_on
        if set(kinds) & {"jsonl", "parquet"}:
            desc["text_field"] = self.text_field
        if self.chat:
            desc.pop("text_field", None)
            desc["messages_field"] = MESSAGES_FIELD
        # Only when used, so that the description (and the fingerprint) of other corpora stays as it was.
        if self.ext is not None:
            desc["ext"] = list(self.ext)
        if self.skipped:
            desc["skipped_files"] = len(self.skipped)
            desc["example_skipped_files"] = [str(p) for p in self.skipped[:EXAMPLE_FILES]]
        if self.preset is not None:
            desc.update(preset=self.preset.name, url=self.preset.url, sha256=self.preset.sha256)
        return desc

    def signature(self) -> str:
        h = hashlib.sha256()
        for f in [*self.files, *self.skipped]:  # a skipped file that changes may be text now
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def record_fields(self) -> list[str] | None:
        if any(_kind_of(f) == "text" for f in self.files):
            return None
        path = self.files[0]
        if _kind_of(path) == "parquet":
            return _parquet_file(path).schema_arrow.names
        with _open_input(path) as f:
            for line in read_jsonl(f, path, "one JSON object", decode=Utf8Decoder().decode_whole):
                if not line.blank:
                    return list(line.record) if isinstance(line.record, dict) else []
        return []

    def pieces(self) -> Iterator[Piece]:
        doc = DocumentPieces(self.piece_chars)
        readers = {"text": self._text_pieces, "jsonl": self._jsonl_pieces, "parquet": self._parquet_pieces}
        for path in self.files:
            yield from readers[_kind_of(path)](path, doc)
        self.stats.empty_documents += doc.empty_documents

    def _count(self, doc_pieces: Iterator[tuple[str, bool]], progress: int) -> Iterator[Piece]:
        """Attach the progress made so far to the first piece (or to an empty one if there is none)."""
        for text, starts in doc_pieces:
            yield text, starts, progress
            progress = 0
        if progress:
            yield "", False, progress

    def _note_replacements(self, path: Path, decoder: Utf8Decoder) -> None:
        if decoder.replaced:
            self.stats.replaced_bytes += decoder.replaced
            self.stats.files_with_replacements.append(str(path))

    def _text_pieces(self, path: Path, doc: DocumentPieces) -> Iterator[Piece]:
        decoder = Utf8Decoder()
        sep = self.split_on
        pending = ""  # text after the last separator, not yet handed to `doc` (may hold a partial sep)
        first = True
        with _open_input(path) as f:
            while True:
                data = f.read(READ_BYTES)
                final = not data
                text = decoder.decode(data, final)
                if first and text:
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
                    first = False
                out: list[tuple[str, bool]] = []
                if sep:
                    # One split per read (not a find/slice loop, which copies the buffer per document).
                    *complete, pending = (pending + text).split(sep)
                    for part in complete:
                        out += doc.add(part)
                        out += doc.end()
                    keep = 0 if final else len(sep) - 1  # the tail may be the start of a separator
                    head, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                    out += doc.add(head)
                else:
                    out += doc.add(text)
                if final:
                    out += doc.end()
                yield from self._count(iter(out), len(data))
                if final:
                    break
        self._note_replacements(path, decoder)

    def _jsonl_pieces(self, path: Path, doc: DocumentPieces) -> Iterator[Piece]:
        decoder = Utf8Decoder()
        field_name = self.text_field
        with _open_input(path) as f:
            for line in read_jsonl(f, path, "one JSON object", decode=decoder.decode_whole):
                if line.blank:
                    yield from self._count(iter(()), line.size)
                    continue
                if self.chat:
                    conversation = conversation_pieces(line.record, line.where, self.skipped_records)
                    yield from self._count(conversation, line.size)
                    continue
                text = _field(line.record, field_name, line.where)
                yield from self._count(doc.whole(text), line.size)
        self._note_replacements(path, decoder)

    def _parquet_pieces(self, path: Path, doc: DocumentPieces) -> Iterator[Piece]:
        import pyarrow as pa

        pf = _parquet_file(path)
        schema = pf.schema_arrow
        column = MESSAGES_FIELD if self.chat else self.text_field
        if column not in schema.names:
            how = "prepare it as text with --format text" if self.chat else "choose the text column with --text-field"
            raise GPT2LabError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); {how}")
        column_type = schema.field(column).type
        # A chat row's messages are checked as a conversation, and a bad row is skipped.
        if not self.chat and not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise GPT2LabError(
                f"{path}: column {self.text_field!r} has type {column_type}, not string; "
                "choose the text column with --text-field"
            )
        rows = max(1, pf.metadata.num_rows)
        size = path.stat().st_size
        done_rows, done_bytes = 0, 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[column]):
                texts = batch.column(0).to_pylist()
                done_rows += len(texts)
                advance = size * done_rows // rows - done_bytes
                done_bytes += advance
                pieces: list[tuple[str, bool]] = []
                for row, text in enumerate(texts, done_rows - len(texts) + 1):
                    if self.chat:
                        pieces += conversation_pieces({column: text}, f"{path}: row {row}", self.skipped_records)
                    else:
                        pieces += doc.whole(text or "")
                yield from self._count(iter(pieces), advance)
        except (pa.ArrowException, OSError) as e:
            raise GPT2LabError(f"{path}: cannot read Parquet data ({e})") from None


def _parquet_file(path: Path) -> Any:
    """An opened pyarrow ParquetFile, or a GPT2LabError saying the file is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        pf.schema_arrow  # noqa: B018  (reads the schema: a damaged file fails here)
    except (pa.ArrowException, OSError) as e:
        raise GPT2LabError(f"{path}: not a readable Parquet file ({e})") from None
    return pf


def _open_input(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise GPT2LabError(f"cannot read {path}: {e.strerror or e}") from None


def _field(record: Any, name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise GPT2LabError(f"{where}: expected a JSON object with a {name!r} field, got {type(record).__name__}")
    if name not in record:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        raise GPT2LabError(f"{where}: no field {name!r} (fields: {fields}); choose the text field with --text-field")
    text = record[name]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise GPT2LabError(f"{where}: field {name!r} is a {type(text).__name__}, not a string")
    return text


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _needs_sniffing(path: Path) -> bool:
    """Files without a text, JSONL or Parquet suffix are taken only if they hold text."""
    return not path.name.lower().endswith(KNOWN_SUFFIXES)


def _has_nul(path: Path) -> bool:
    with _open_input(path) as f:
        return b"\0" in f.read(SNIFF_BYTES)


def _is_utf8_text(path: Path) -> bool:
    """No NUL byte in the first SNIFF_BYTES and valid UTF-8 throughout (read once, in blocks)."""
    if _has_nul(path):
        return False
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        with _open_input(path) as f:
            while data := f.read(READ_BYTES):
                decoder.decode(data)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def normalize_ext(ext: Iterable[str]) -> tuple[str, ...]:
    """File suffixes as `ext` takes them: 'PY', '.py' -> 'py'; sorted, without repeats."""
    out = set()
    for item in ext:
        e = item.strip().lstrip(".").lower()
        if not e or not re.fullmatch(r"[^\s/\\*?\[\]]+", e):
            raise GPT2LabError(f"--ext: {item!r} is not a file suffix; give suffixes like py,c,rs")
        out.add(e)
    if not out:
        raise GPT2LabError("--ext: give at least one file suffix, e.g. --ext py,c")
    return tuple(sorted(out))


def _has_ext(path: Path, ext: tuple[str, ...] | None) -> bool:
    return ext is None or path.name.lower().endswith(tuple(f".{e}" for e in ext))


def _find_files(spec: str, ext: tuple[str, ...] | None = None) -> tuple[list[Path], bool]:
    """The files SPEC names, in reading order, and whether SPEC is one file named explicitly."""
    path = Path(spec).expanduser()
    wanted = "" if ext is None else " " + ", ".join(f".{e}" for e in ext)
    if path.is_file():
        if not _has_ext(path, ext):
            raise GPT2LabError(f"{spec}: not a{wanted} file, as --ext asks; drop --ext or give other files")
        return [path], True
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and _has_ext(p, ext)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [p for p in files if not _is_hidden(p, path)]
        if not files:
            raise GPT2LabError(
                f"{spec}: no{wanted} files in this directory (hidden ones are skipped); point at the corpus files"
            )
        return files, False
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file() and _has_ext(p, ext)]
        if not files:
            raise GPT2LabError(f"{spec}: the pattern matches no{wanted} files")
        return files, False
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        hint = f"; for the Hugging Face dataset of that name write {HF_PREFIX}{spec}"
    presets = ", ".join(CORPUS_PRESETS)
    raise GPT2LabError(f"{spec}: no such file, directory or preset (presets: {presets}){hint}")


class HFSource(Source):
    """A Hugging Face dataset, read with `datasets` in streaming mode (nothing is stored as text)."""

    progress_unit = "doc"

    def __init__(
        self, dataset: str, shard_prefix: str, piece_chars: int, config: str | None, split: str, text_field: str
    ) -> None:
        super().__init__(dataset, shard_prefix, piece_chars)
        self.dataset, self.config, self.split, self.text_field = dataset, config, split, text_field
        self._ds: Any = None
        self._datasets_version = ""
        self._start: dict[str, Any] | None = None  # where pieces() starts (seek)
        self._position: dict[str, Any] | None = None  # after the last piece yielded

    def _where(self) -> str:
        config = f", config {self.config!r}" if self.config else ""
        return f"Hugging Face dataset {self.dataset!r}{config}, split {self.split!r}"

    def open(self) -> None:
        self._ds = load_hf_dataset(
            self.dataset,
            self.config,
            self.split,
            streaming=True,
            where=self._where(),
            check="check the name, --hf-config, --split and the network",
            instead="connect to the internet (a Hub dataset is streamed as it is tokenized), or prepare local "
            "text, JSONL or Parquet files: gpt2lab prepare PATH --out DIR",
        )
        import datasets  # loaded by load_hf_dataset

        self._datasets_version = datasets.__version__
        info = getattr(self._ds, "info", None)
        splits = getattr(info, "splits", None) or {}
        if self.split in splits and splits[self.split].num_examples:
            self.progress_total = int(splits[self.split].num_examples)

    def describe(self) -> dict[str, Any]:
        desc = {
            "kind": "hf",
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }
        if self.chat:
            desc.pop("text_field")
            desc["messages_field"] = MESSAGES_FIELD
        if self.preset is not None:
            desc["preset"] = self.preset.name
        return desc

    def record_fields(self) -> list[str] | None:
        features = getattr(self._ds, "features", None)
        if features is not None:
            return list(features)
        for example in self._ds:  # a stream that does not know its columns: look at its first example
            return list(example)
        return []

    def signature(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def position_unsupported(self) -> str | None:
        if not (hasattr(self._ds, "state_dict") and hasattr(self._ds, "load_state_dict")):
            return (
                f"datasets {self._datasets_version} cannot save a streaming dataset's position "
                "(IterableDataset.state_dict needs datasets >= 2.18)"
            )
        return None

    def position(self) -> dict[str, Any] | None:
        return self._position

    def seek(self, position: dict[str, Any]) -> None:
        """Continue after `position`: the dataset's own stream state (`IterableDataset.state_dict()`,
        which `datasets` restores at its source shard and example offset) after `examples` examples,
        and how many pieces of the next example were already handed out."""
        if position.get("datasets") != self._datasets_version:
            raise ValueError(
                f"the position was saved by datasets {position.get('datasets')}, this is {self._datasets_version}"
            )
        self._start = position
        self.progress_done = position["examples"]

    def _mark(self, state: Any, examples: int, skip: int, empty: int) -> None:
        self._position = {
            "datasets": self._datasets_version,
            "state": state,
            "examples": examples,
            "skip_pieces": skip,
            "empty_documents": empty,
        }
        if self.chat:
            self._position["skipped_records"] = self.skipped_records.to_json()

    def pieces(self) -> Iterator[Piece]:
        doc = DocumentPieces(self.piece_chars)
        ds, start = self._ds, self._start
        tracked = self.position_unsupported() is None
        n, skip, before = 0, 0, None  # examples read; pieces of the next one to skip; state after n
        if start is not None:
            n, skip, before = start["examples"], start["skip_pieces"], start["state"]
            doc.empty_documents = start["empty_documents"]
            if self.chat:
                self.skipped_records.restore(start["skipped_records"])
            if before is not None:
                ds.load_state_dict(before)
        if tracked:
            self._mark(before, n, skip, doc.empty_documents)
        before_examples = n
        try:
            for n, example in enumerate(ds, start=before_examples + 1):
                # The stream state after this example (a small dict, copied): where a resume restarts.
                after = ds.state_dict() if tracked else None
                where = f"{self._where()}, example {n}"
                if self.chat:
                    example_pieces = conversation_pieces(example, where, self.skipped_records)
                else:
                    example_pieces = doc.whole(_field(example, self.text_field, where))
                handed = 0  # pieces of this example yielded, the skipped ones included
                last: tuple[str, bool] | None = None
                for piece in example_pieces:
                    if last is not None:
                        handed += 1
                        if handed > skip:
                            if tracked:
                                self._mark(before, n - 1, handed, doc.empty_documents)
                            yield last[0], last[1], int(last[1])
                    last = piece
                if tracked:  # the position after this example's last piece is the next example
                    self._mark(after, n, 0, doc.empty_documents)
                if last is not None and handed + 1 > skip:
                    yield last[0], last[1], int(last[1])
                elif last is None:  # an empty document or a skipped record: progress only
                    yield "", False, 1
                skip, before = 0, after
        except GPT2LabError:
            raise
        except Exception as e:  # a network failure mid-stream: the run can be resumed
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GPT2LabError(
                f"reading the {self._where()} failed after {n} examples: {reason}; run the same command again to resume"
            ) from None
        self.stats.empty_documents += doc.empty_documents


def resolve_source(
    spec: str,
    *,
    text_field: str | None = None,
    split_on: str | None = None,
    hf_config: str | None = None,
    hf_split: str | None = None,
    piece_chars: int = DEFAULT_PIECE_CHARS,
    ext: Iterable[str] | None = None,
) -> Source:
    """The `Source` named by SOURCE on the command line: a preset, `hf:NAME`, or a local path / glob.

    Options left as None take the preset's values (or the defaults: field "text", split "train").
    `ext` (file suffixes, with or without the dot) is for local files only.
    Nothing is read or downloaded until `open()`, except that a bundled preset (tinyshakespeare) is
    decompressed into the cache here (once).
    """
    preset = CORPUS_PRESETS.get(spec)
    suffixes = None if ext is None else normalize_ext(ext)
    if suffixes is not None and (preset is not None or spec.startswith(HF_PREFIX)):
        raise GPT2LabError(f"--ext selects local files by suffix; {spec!r} is a preset or dataset, not files")
    if preset is not None and preset.hf_dataset is None:
        path = bundled_text(preset)
        source: Source = FileSource(
            str(path), preset.shard_prefix, piece_chars, text_field or preset.text_field, split_on
        )
    elif preset is not None or spec.startswith(HF_PREFIX):
        dataset = preset.hf_dataset if preset else spec[len(HF_PREFIX) :]
        if not dataset:
            raise GPT2LabError(
                f"{spec!r}: give the dataset name after '{HF_PREFIX}', e.g. hf:HuggingFaceFW/fineweb-edu"
            )
        assert dataset is not None
        prefix = preset.shard_prefix if preset else _prefix_from(dataset)
        source = HFSource(
            dataset,
            prefix,
            piece_chars,
            hf_config if hf_config is not None else (preset.hf_config if preset else None),
            hf_split or (preset.hf_split if preset else "train"),
            text_field or (preset.text_field if preset else "text"),
        )
    else:
        source = FileSource(spec, _prefix_from(spec), piece_chars, text_field or "text", split_on, suffixes)
    source.preset = preset
    return source


def bundled_text(preset: CorpusPreset) -> Path:
    """A bundled preset's text as a plain file in the cache, decompressed from the package on first use.

    The text is checked against the preset's sha256 every time (1 MB hashes in milliseconds), so a
    damaged cache copy is replaced and a damaged package is an error, never a silently different
    corpus. The copy is written to a temporary name and renamed, so concurrent first uses are safe.
    """
    assert preset.bundled is not None and preset.sha256 is not None
    path = cache_dir() / f"{preset.name}.txt"
    if path.is_file() and file_sha256(path) == preset.sha256:
        return path
    bundle = resources.files(__package__) / preset.bundled
    h = hashlib.sha256()
    try:
        with resources.as_file(bundle) as gz_path, gzip.open(gz_path, "rb") as f, atomic_open(path, "wb") as out:
            while chunk := f.read(READ_BYTES):
                out.write(chunk)
                h.update(chunk)
            if h.hexdigest() != preset.sha256:
                raise GPT2LabError(
                    f"the bundled {preset.name} text ({bundle}) has sha256 {h.hexdigest()}, expected "
                    f"{preset.sha256}: the installation is damaged; reinstall gpt2lab"
                )
    except (OSError, EOFError, zlib.error) as e:
        raise GPT2LabError(
            f"cannot unpack the bundled {preset.name} text ({bundle}) into {path}: {e}; reinstall gpt2lab, "
            f"or download {preset.url} and pass its local path"
        ) from None
    return path


def _prefix_from(spec: str) -> str:
    """A shard file prefix from a path or dataset name: 'data/my-corpus/*.txt' -> 'my-corpus'."""
    parts = [p for p in re.split(r"[/\\]", spec) if p and not glob.has_magic(p) and p not in (".", "..")]
    stem = parts[-1] if parts else "corpus"
    for suffix in KNOWN_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-.") or "corpus"
    return stem
