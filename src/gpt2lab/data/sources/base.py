"""What every source is: the `Source` interface, the pieces it yields, and the named corpus presets."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ...errors import GPT2LabError
from ..conversations import SkippedRecords

# (text, starts_document, progress), in a fixed order: a document is one or more consecutive pieces of
# about `piece_chars` characters, the first with starts_document true; progress is how far through the
# input the piece brings the stream, in the source's `progress_unit`, for the progress bar.
Piece = tuple[str, bool, int]

DEFAULT_PIECE_CHARS = 1 << 20
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


def record_text(record: Any, name: str, where: str) -> str:
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
