"""Where documents come from: local text / JSONL / Parquet files, Hugging Face datasets, named presets.

Every source yields its documents as pieces of bounded size, cut where GPT-2's pre-tokenizer splits
anyway (text.safe_cut): memory stays bounded, pieces tokenize in parallel, and their tokens are exactly
the whole document's.

- base.py: the `Source` interface, `Piece`, the named presets (`CORPUS_PRESETS`);
- files.py: `FileSource`, local text / JSONL / Parquet files (a file, a directory or a glob);
- hf.py: `HFSource`, a Hugging Face dataset, streamed.

`resolve_source` turns SOURCE on the command line into one of them.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import re
import zlib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from ...download import cache_dir
from ...errors import GPT2LabError
from ...fileio import atomic_open, file_sha256
from .base import CORPUS_PRESETS, DEFAULT_PIECE_CHARS, HF_PREFIX, CorpusPreset, Piece, Source, SourceStats
from .files import KNOWN_SUFFIXES, READ_BYTES, FileSource, normalize_ext
from .hf import HFSource

__all__ = [
    "CORPUS_PRESETS",
    "DEFAULT_PIECE_CHARS",
    "HF_PREFIX",
    "CorpusPreset",
    "FileSource",
    "HFSource",
    "Piece",
    "Source",
    "SourceStats",
    "bundled_text",
    "normalize_ext",
    "resolve_source",
]


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
    bundle = resources.files("gpt2lab.data") / preset.bundled
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
