"""Training a byte-level BPE tokenizer with GPT-2's rules, and comparing tokenizers on a corpus.

The Hugging Face `tokenizers` trainer (Rust, multithreaded) learns the merges; the result is saved in
tiktoken's format, so encoding runs in tiktoken as GPT-2's own tokenizer does, and as `tokenizers`
JSON for exporting to Hugging Face.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import GPT2LabError
from .fileio import atomic_dir, atomic_write_bytes, atomic_write_json
from .tokenizer import (
    DESCRIPTOR,
    EOT_TEXT,
    GPT2_PATTERN,
    HF_FILE,
    RANKS_FILE,
    Tokenizer,
    gpt2_byte_to_unicode,
    load_tokenizer_dir,
    write_ranks,
)

# tiktoken's cl100k_base split pattern (GPT-4): case-insensitive contractions, digits in groups of <= 3.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
MIN_VOCAB = 257  # 256 bytes + <|endoftext|>


@dataclass
class TrainedBPE:
    ranks: dict[bytes, int]
    pattern: str
    hf_json: str  # the `tokenizers` library's serialisation
    chars: int  # characters of training text seen
    documents: int


def limit_chars(texts: Iterable[str], max_chars: int | None, counter: Counter) -> Iterator[str]:
    """Pass documents through until `max_chars` characters have been given (the last one cut)."""
    for text in texts:
        if max_chars is not None and counter["chars"] + len(text) > max_chars:
            text = text[: max_chars - counter["chars"]]
        if text:
            counter["chars"] += len(text)
            counter["documents"] += 1
            yield text
        if max_chars is not None and counter["chars"] >= max_chars:
            return


def bpe_trainer(merge_vocab: int, pattern: str, progress: bool = True):
    """A `tokenizers` BPE tokenizer and trainer with GPT-2's byte-level rules, learning `merge_vocab`
    tokens (the 256 bytes included): text is split exactly as tiktoken will split it (`pattern`), then
    its bytes are mapped to GPT-2's printable alphabet."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=merge_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=progress,
    )
    return hf, trainer


def train_bpe(
    texts: Iterable[str], vocab_size: int, pattern: str = "gpt2", max_chars: int | None = None, progress: bool = True
) -> TrainedBPE:
    """Learn a byte-level BPE of `vocab_size` tokens in all: 256 bytes, merges, and <|endoftext|> last."""
    if vocab_size < MIN_VOCAB:
        raise GPT2LabError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + <|endoftext|>), got {vocab_size}")
    if pattern not in PATTERNS:
        raise GPT2LabError(f"unknown --pattern {pattern!r}: use one of {', '.join(PATTERNS)}")
    pat = PATTERNS[pattern]
    hf, trainer = bpe_trainer(vocab_size - 1, pat, progress)
    counter: Counter = Counter()
    hf.train_from_iterator(limit_chars(texts, max_chars, counter), trainer=trainer)
    if counter["chars"] == 0:
        raise GPT2LabError("the corpus holds no text to train a tokenizer on")
    learned = hf.get_vocab_size()
    if learned < vocab_size - 1:
        raise GPT2LabError(
            f"the corpus ({counter['chars']:,} characters) only supports {learned + 1} tokens, not {vocab_size}; "
            "give more text (or a larger --max-chars) or a smaller --vocab-size"
        )
    from_unicode = {u: b for b, u in gpt2_byte_to_unicode().items()}
    # Byte-level BPE makes the token of merge k with id 256 + k, and tiktoken merges the pair whose
    # concatenation has the lowest rank: rank = id replays the same merges in the same order
    # (tests/test_tokenizer_train.py compares the two libraries' tokens).
    ranks = {bytes(from_unicode[c] for c in token): i for token, i in hf.get_vocab().items()}
    if sorted(ranks.values()) != list(range(vocab_size - 1)):
        raise AssertionError("the BPE trainer returned non-contiguous token ids")
    # Register <|endoftext|> with the HF tokenizer too, so its JSON exports the same special token.
    hf.add_special_tokens([EOT_TEXT])
    return TrainedBPE(ranks, pat, hf.to_str(), counter["chars"], counter["documents"])


def save_trained(
    trained: TrainedBPE,
    out_dir: str | os.PathLike,
    name: str | None = None,
    source: dict | None = None,
    overwrite: bool = False,
) -> Tokenizer:
    """Write a trained tokenizer directory atomically and return it loaded."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GPT2LabError(f"{out} already exists and is not empty; choose a new --out or pass --overwrite")
    ranks_bytes = write_ranks(trained.ranks)
    hf_bytes = trained.hf_json.encode()
    n_vocab = len(trained.ranks) + 1
    name = name or f"bpe{n_vocab}-{hashlib.sha256(ranks_bytes).hexdigest()[:8]}"
    import tiktoken

    enc = tiktoken.Encoding(
        name=name,
        pat_str=trained.pattern,
        mergeable_ranks=trained.ranks,
        special_tokens={EOT_TEXT: n_vocab - 1},
        explicit_n_vocab=n_vocab,
    )
    desc = {
        "format": "gpt2lab-tokenizer",
        "format_version": 1,
        "name": name,
        "n_vocab": n_vocab,
        "pattern": trained.pattern,
        "special_tokens": {EOT_TEXT: n_vocab - 1},
        "files": {
            RANKS_FILE: hashlib.sha256(ranks_bytes).hexdigest(),
            HF_FILE: hashlib.sha256(hf_bytes).hexdigest(),
        },
        "vocab_hash": Tokenizer(enc).vocab_hash,
        "trained_on": {"characters": trained.chars, "documents": trained.documents, **(source or {})},
    }
    with atomic_dir(out, overwrite=True) as tmp:
        atomic_write_bytes(tmp / RANKS_FILE, ranks_bytes)
        atomic_write_bytes(tmp / HF_FILE, hf_bytes)
        atomic_write_json(tmp / DESCRIPTOR, desc)
    return load_tokenizer_dir(out)


@dataclass
class TokenizerStats:
    name: str
    n_vocab: int
    tokens: int
    bytes: int
    chars: int
    vocab_used: int

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / self.bytes if self.bytes else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else 0.0

    @property
    def vocab_use(self) -> float:
        return self.vocab_used / self.n_vocab

    def as_dict(self) -> dict:
        return {
            "tokenizer": self.name,
            "n_vocab": self.n_vocab,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "chars": self.chars,
            "tokens_per_byte": self.tokens_per_byte,
            "bytes_per_token": self.bytes_per_token,
            "tokens_per_char": self.tokens_per_char,
            "vocab_used": self.vocab_used,
            "vocab_use": self.vocab_use,
        }


def corpus_stats(texts: Iterable[str], tokenizers: list[Tokenizer], batch: int = 256) -> list[TokenizerStats]:
    """Tokens per byte / per character and the share of each vocabulary used, over the same texts."""
    import numpy as np

    counts = [np.zeros(t.n_vocab, dtype=np.int64) for t in tokenizers]
    totals = Counter()
    chunk: list[str] = []

    def flush() -> None:
        for tok, count in zip(tokenizers, counts):
            for ids in tok.encode_batch(chunk):
                np.add.at(count, np.asarray(ids, dtype=np.int64), 1)
        chunk.clear()

    for text in texts:
        totals["chars"] += len(text)
        totals["bytes"] += len(text.encode("utf-8"))
        chunk.append(text)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    if totals["chars"] == 0:
        raise GPT2LabError("the corpus holds no text to measure")
    return [
        TokenizerStats(t.name, t.n_vocab, int(c.sum()), totals["bytes"], totals["chars"], int((c > 0).sum()))
        for t, c in zip(tokenizers, counts)
    ]


def describe(stats: list[TokenizerStats]) -> str:
    """A small aligned table for the terminal."""
    head = f"{'tokenizer':<24} {'vocab':>7} {'tokens':>12} {'bytes/token':>11} {'tokens/char':>11} {'vocab used':>10}"
    rows = [head]
    for s in stats:
        rows.append(
            f"{s.name:<24} {s.n_vocab:>7} {s.tokens:>12,} {s.bytes_per_token:>11.3f} {s.tokens_per_char:>11.3f} "
            f"{s.vocab_use:>9.1%}"
        )
    return "\n".join(rows)


def json_dump(stats: list[TokenizerStats]) -> str:
    return json.dumps([s.as_dict() for s in stats], indent=2)
