"""Perplexity and bits-per-byte of a text with a strided sliding window.

The method of Hugging Face's guide "Perplexity of fixed-length models"
(transformers docs/source/en/perplexity.md): windows of `context` tokens start every `stride`
tokens, and each window scores the tokens the previous window did not reach, each conditioned on
the tokens before it in its window. With stride < context every token after the first is scored
exactly once, with at least `context - stride` tokens of context (or all earlier tokens, near the
start). With stride == context the windows are disjoint chunks and, as in the guide, the first token
of every chunk, which has nothing before it in its window, is not scored. The first token of the text
is never scored; `bos=True` puts <|endoftext|> in front of the text so that it is.

    perplexity     = exp(total NLL / scored tokens)
    bits per byte  = total NLL / ln 2 / UTF-8 bytes of the text

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.

Under torchrun, rank r computes windows r, r + W, ...; the per-window sums are all-reduced and
added in window order, so the result does not depend on the number of ranks or the batch size
(beyond the float rounding of the forward pass itself).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.sources import HF_PREFIX
from ..download import load_hf_dataset
from ..errors import GPT2LabError
from ..model import unwrap
from ..runtime import autocast
from .common import EvalContext, EvalResult, hidden_at, token_nll, windowed_sum

# Corpora known by name: WikiText-2's test split as Hugging Face's guide reads it.
NAMED_CORPORA: dict[str, dict[str, str]] = {
    "wikitext-2": {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"},
}
DEFAULT_JOIN = "\n\n"


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; tokens [first, end) are scored."""

    begin: int
    end: int
    first: int


@dataclass(frozen=True)
class PerplexityResult(EvalResult):
    nll: float  # total negative log-likelihood of the scored tokens, nats
    scored_tokens: int
    tokens: int  # length of the evaluated token sequence (with the <|endoftext|> in front, if any)
    windows: int
    context: int
    stride: int
    bytes: int | None = None  # UTF-8 bytes of the text, for bits per byte

    @property
    def loss(self) -> float:
        """Mean NLL per scored token, nats."""
        return self.nll / self.scored_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def metrics(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"perplexity": self.perplexity, "perplexity_tokens": self.scored_tokens}
        if self.bits_per_byte is not None:
            out["perplexity_bits_per_byte"] = self.bits_per_byte
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
        }


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of the guide's loop: begin = 0, stride, 2*stride, ... until a window reaches the end.

    Window i scores from where window i-1 ended (from token 1 for the first window).
    """
    if not 1 <= stride <= context:
        raise GPT2LabError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n_tokens < 2:
        raise GPT2LabError(f"the text is {n_tokens} token(s) long; perplexity needs at least 2 tokens")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _window_batches(windows: Sequence[int], all_windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """Group window indices into batches of equal-length windows (only the last window is shorter)."""
    batches: list[list[int]] = []
    for w in windows:
        length = all_windows[w].end - all_windows[w].begin
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and all_windows[last[0]].end - all_windows[last[0]].begin == length:
            last.append(w)
        else:
            batches.append([w])
    return batches


def evaluate(
    model: nn.Module,
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    ctx: EvalContext | None = None,
    *,
    context: int | None = None,
    stride: int | None = None,
    n_bytes: int | None = None,
) -> PerplexityResult:
    """Sliding-window NLL of `tokens` (shape (N,)) under `model`.

    context: window length (default and maximum: the model's block_size); stride: how far each
    window moves (default: context // 2, the guide's 512 for 1024). `ctx.batch_size` windows per
    forward pass. n_bytes: UTF-8 size of the text, for bits per byte. Every rank returns the same result.
    """
    ctx = ctx or EvalContext()
    gpt = unwrap(model)
    block = gpt.config.block_size
    context = block if context is None else context
    if not 2 <= context <= block:
        raise GPT2LabError(f"context must be between 2 and the model's block size ({block}), got {context}")
    stride = max(1, context // 2) if stride is None else stride
    seq = torch.as_tensor(np.asarray(tokens, dtype=np.int64))  # (N,)
    if seq.numel() and int(seq.max()) >= gpt.config.vocab_size:
        raise GPT2LabError(f"token id {int(seq.max())} is outside the model's vocabulary of {gpt.config.vocab_size}")
    windows = sliding_windows(seq.numel(), context, stride)
    device = ctx.device_for(gpt)

    def score(batch: list[int]) -> torch.Tensor:
        ws = [windows[w] for w in batch]
        idx = torch.stack([seq[w.begin : w.end] for w in ws])  # (b, L)
        # Position p predicts token p + 1: scored tokens [first, end) come from positions [first - 1, end - 1).
        rows = torch.cat([torch.full((w.end - w.first,), i) for i, w in enumerate(ws)])  # (n,)
        cols = torch.cat([torch.arange(w.first - 1 - w.begin, w.end - 1 - w.begin) for w in ws])  # (n,)
        targets = idx[rows, cols + 1]  # (n,)
        idx, rows, cols, targets = (t.to(device) for t in (idx, rows, cols, targets))
        with autocast(device, ctx.autocast_dtype):  # logits for the scored positions, a chunk at a time
            losses = token_nll(gpt, hidden_at(gpt, idx, rows, cols), targets).double()  # (n,)
        return torch.zeros(len(ws), dtype=torch.float64, device=device).index_add_(0, rows, losses)  # (b,)

    batches = lambda mine: _window_batches(mine, windows, ctx.batch_size)
    per_window = windowed_sum(gpt, len(windows), ctx, score, "perplexity", batches)
    nll = float(per_window.cpu().sum())  # in window order on every rank
    scored = sum(w.end - w.first for w in windows)
    return PerplexityResult(nll, scored, int(seq.numel()), len(windows), context, stride, n_bytes)


def method(context: int, stride: int, bos: bool) -> str:
    """One sentence saying which tokens were scored, for the terminal and --json."""
    head = f"sliding window (Hugging Face perplexity guide): windows of {context} tokens every {stride} tokens"
    bos_note = "; <|endoftext|> is put in front of the text" if bos else ""
    if stride < context:
        who = "every token of the text" if bos else "every token but the first"
        return (
            f"{head}{bos_note}; {who} is scored exactly once, with at least {context - stride} tokens of "
            "context (all earlier tokens near the start)"
        )
    return (
        f"{head} (disjoint chunks){bos_note}; every token is scored with the tokens before it in its chunk, "
        "except the first token of each chunk, which has none"
    )


# ----------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """A text to evaluate, and how it was assembled."""

    text: str
    source: dict[str, Any]


def read_corpus(
    spec: str,
    text_field: str = "text",
    hf_config: str | None = None,
    split: str | None = None,
    join: str = DEFAULT_JOIN,
) -> Corpus:
    """The text named by `spec`, its documents joined with `join`:
    - a named corpus (`wikitext-2`) or `hf:DATASET` (with `hf_config`, `split`, default "test"):
      every row of the split, as the Hugging Face guide reads WikiText;
    - a text, JSONL or Parquet file, a directory or a glob of them, or a file preset of
      `gpt2lab prepare` (tinyshakespeare), read by gpt2lab.data.sources: a text file is one
      document, a JSONL record or Parquet row one document (`text_field`).
    """
    if spec in NAMED_CORPORA:
        named = NAMED_CORPORA[spec]
        return _read_hf(named["dataset"], named["config"], named["split"], text_field, join, name=spec)
    if spec.startswith(HF_PREFIX):
        dataset = spec[len(HF_PREFIX) :]
        if not dataset:
            raise GPT2LabError(f"{spec!r}: give the dataset name after '{HF_PREFIX}', e.g. hf:Salesforce/wikitext")
        return _read_hf(dataset, hf_config, split or "test", text_field, join)
    return _read_files(spec, text_field, join)


def _read_files(spec: str, text_field: str, join: str) -> Corpus:
    from ..data.sources import CORPUS_PRESETS, resolve_source

    preset = CORPUS_PRESETS.get(spec)
    if preset is None and not Path(spec).expanduser().exists() and not glob.has_magic(spec):
        names = ", ".join(NAMED_CORPORA)
        raise GPT2LabError(
            f"{spec}: no such file or directory; give a text, JSONL or Parquet file, hf:DATASET, or {names}"
        )
    if preset is not None and preset.hf_dataset is not None:
        raise GPT2LabError(
            f"{spec} is a large training corpus; prepare it with 'gpt2lab prepare' and use --task val-loss"
        )
    source = resolve_source(spec, text_field=text_field)
    source.open()
    documents: list[list[str]] = []
    for text, starts_document, _ in source.pieces():
        if starts_document:
            documents.append([])
        if text:
            documents[-1].append(text)
    if source.stats.replaced_bytes:
        raise GPT2LabError(
            f"{source.stats.files_with_replacements[0]}: not UTF-8 text (undecodable bytes: "
            f"{source.stats.replaced_bytes}); perplexity is measured on UTF-8 text only"
        )
    if not documents:
        raise GPT2LabError(f"{spec}: no text to evaluate (every document is empty)")
    text = join.join("".join(parts) for parts in documents)
    return Corpus(text, {**source.describe(), "documents": len(documents), "join": join})


def _read_hf(
    dataset: str, config: str | None, split: str, text_field: str, join: str, name: str | None = None
) -> Corpus:
    """Rows of a Hugging Face dataset split joined with `join`, empty rows included.

    This is the guide's `"\\n\\n".join(test["text"])`: WikiText marks paragraph breaks with empty
    rows, and keeping them gives the text whose perplexity the guide reports.
    """
    where = f"Hugging Face dataset {dataset!r}" + (f", config {config!r}" if config else "") + f", split {split!r}"
    ds = load_hf_dataset(
        dataset,
        config,
        split,
        streaming=False,
        where=where,
        check="check the name, --hf-config and --split",
        instead="connect to the internet once to cache it, or evaluate a local file: --data path/to/file.txt",
    )
    if text_field not in ds.column_names:
        raise GPT2LabError(f"the {where} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    rows = [t or "" for t in ds[text_field]]
    source = {"kind": "hf", "dataset": dataset, "config": config, "split": split, "text_field": text_field}
    if name:
        source["name"] = name
    return Corpus(join.join(rows), {**source, "documents": len(rows), "join": join})


def corpus_tokens(corpus: Corpus, tokenizer, bos: bool = False, max_tokens: int | None = None) -> tuple[list[int], int]:
    """Token ids to evaluate (<|endoftext|> first when `bos`) and the UTF-8 bytes of the text they cover.

    `max_tokens` keeps the first that many tokens of the text; the byte count then covers exactly
    those tokens (GPT-2's BPE is byte-level, so decoding them gives their bytes back).
    """
    tokens = tokenizer.encode(corpus.text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise GPT2LabError(f"max tokens must be at least 2, got {max_tokens}")
        tokens = tokens[:max_tokens]
        n_bytes = len(tokenizer.decode_bytes(tokens))
    else:
        n_bytes = len(corpus.text.encode("utf-8"))
    if bos:
        tokens = [tokenizer.eot_token, *tokens]
    return tokens, n_bytes
