"""Local files as a source: one file, a directory or a glob of text, JSONL and Parquet files."""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ...errors import GPT2LabError
from ...jsonl import read_jsonl
from ..conversations import MESSAGES_FIELD, conversation_pieces
from ..text import DocumentPieces, Utf8Decoder
from .base import CORPUS_PRESETS, HF_PREFIX, Piece, Source, record_text

TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
READ_BYTES = 1 << 20
# Where a NUL byte marks a file as binary, as git and grep decide it. UTF-8 text never holds one in
# practice, while nearly every binary format (images, archives, object files) does near its start.
SNIFF_BYTES = 8192
EXAMPLE_FILES = 10  # skipped / damaged files named in the manifest


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
                text = record_text(line.record, field_name, line.where)
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
