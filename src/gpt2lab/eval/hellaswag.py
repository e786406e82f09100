"""HellaSwag (Zellers et al. 2019), scored completion style as build-nanogpt and llm.c score it.

Each item is a context and four candidate endings, one of them right (`label`). The model reads
the context followed by " " + ending for each candidate, and the loss of the ending tokens alone
decides (llm.c dev/data/hellaswag.py, build-nanogpt hellaswag.py):

    acc       the candidate with the lowest summed loss over its ending tokens
    acc_norm  the candidate with the lowest mean loss per ending token (the headline number)

This is the "completion style" of those scripts, not the multiple-choice prompt of
lm-evaluation-harness, which reports other numbers for the same model (see references.py).

Data: the official validation set, rowanz/hellaswag data/hellaswag_val.jsonl (10,042 items), one
JSON object per line with at least `ctx` (str), `endings` (4 str) and `label` (0-3).

Each ending's loss is the log-likelihood of " " + ending after the context (scoring.score_requests, as
lm-evaluation-harness's `loglikelihood` is answered). Two ways to run the model give the same scores (up
to float rounding); `score_items` picks by device:
  - on GPUs, `batch_size` items share a forward pass, each candidate a full row (context + ending),
    longest first so that rows of similar length are padded together. Padding sits on the right,
    where causal attention keeps it from the scored positions;
  - on CPUs, which are bound by arithmetic rather than by batch width, an item is one row: its context
    once, then each ending at the positions after it, seeing the context and itself only, about half the
    work.
Either way only the ending positions go through the output projection.

Under torchrun, rank r scores items r, r + W, ... and the counts are summed over the ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..distributed import all_reduce_sum, download_once
from ..errors import GPT2LabError
from ..jsonl import read_jsonl
from ..model import unwrap
from .common import EvalContext, EvalResult, check_vocab
from .scoring import score_requests

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_NAME = "hellaswag_val.jsonl"
VALIDATION_ITEMS = 10042
NUM_ENDINGS = 4
METHOD = (
    "completion style (llm.c / build-nanogpt): context + ' ' + ending per candidate; acc = lowest summed "
    "loss over the ending tokens, acc_norm = lowest mean loss per ending token"
)


@dataclass(frozen=True)
class Item:
    """One HellaSwag question: a context, four endings, the index of the right one."""

    ctx: str
    endings: tuple[str, ...]
    label: int
    where: str = field(default="", compare=False)  # "file:line", for error messages


@dataclass(frozen=True)
class ItemScore:
    """The losses of one item's four candidates (nats, ending tokens only)."""

    label: int
    sum_losses: tuple[float, ...]
    mean_losses: tuple[float, ...]

    @property
    def pred(self) -> int:
        return _argmin(self.sum_losses)

    @property
    def pred_norm(self) -> int:
        return _argmin(self.mean_losses)


@dataclass(frozen=True)
class HellaSwagResult(EvalResult):
    """Counts over all ranks; `acc_norm` is the number to compare with GPT-2's 0.2955."""

    items: int
    correct: int
    correct_norm: int

    @property
    def acc(self) -> float:
        return self.correct / self.items if self.items else float("nan")

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.items if self.items else float("nan")

    def metrics(self, prefix: str = "hellaswag_") -> dict[str, float | int]:
        return {f"{prefix}acc_norm": self.acc_norm, f"{prefix}acc": self.acc, f"{prefix}items": self.items}

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics(prefix=""), "correct": self.correct, "correct_norm": self.correct_norm}


def _argmin(values: Sequence[float]) -> int:
    # First index of the minimum, as torch.argmin picks it in the reference scripts.
    return min(range(len(values)), key=lambda i: (values[i], i))


# ----------------------------------------------------------------------------- data


def validation_file(data: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1) -> Path:
    """`data` if given, else the official validation file, downloaded once into the gpt2lab cache.

    Under torchrun rank 0 downloads while the others wait, so the file is fetched once.
    """
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise GPT2LabError(f"HellaSwag file {path} not found; omit --data to download the official validation set")
        return path
    return download_once(HELLASWAG_URL, CACHE_NAME, rank)


def load_validation(
    data: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1, limit: int | None = None
) -> list[Item]:
    """The items of `data`, or of the official validation set (downloaded once); see validation_file."""
    return read_items(validation_file(data, rank, world_size), limit)


def read_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """Items of a HellaSwag JSONL file (official schema); every problem names the file and line."""
    path = Path(path)
    items: list[Item] = []
    try:
        with open(path, "rb") as f:
            for line in read_jsonl(f, path, "one HellaSwag item with ctx, endings and label"):
                if not line.blank:
                    items.append(parse_item(line.record, line.where))
                if limit is not None and len(items) >= limit:
                    break  # before the next line is read: what lies past the limit is never parsed
    except OSError as e:
        raise GPT2LabError(f"cannot read HellaSwag file {path}: {e.strerror or e}") from None
    if not items:
        raise GPT2LabError(f"{path} holds no HellaSwag items (the file is empty); expected one JSON item per line")
    return items


def parse_item(record: Any, where: str) -> Item:
    """An Item from one parsed JSON record, checked against the official schema."""
    if not isinstance(record, dict):
        raise GPT2LabError(f"{where}: expected a JSON object with ctx, endings and label, got {type(record).__name__}")
    for name in ("ctx", "endings", "label"):
        if name not in record:
            raise GPT2LabError(f"{where}: missing field {name!r}; HellaSwag items need ctx, endings and label")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise GPT2LabError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r:.60}")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise GPT2LabError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings, got {endings!r:.80}")
    # The official files store an int; Hugging Face's copy (Rowan/hellaswag) stores a digit string.
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise GPT2LabError(f"{where}: 'label' must be 0, 1, 2 or 3 (the index of the right ending), got {label!r}")
    return Item(ctx, tuple(endings), label, where)


# ----------------------------------------------------------------------------- scoring


def _encode(item: Item, tokenizer, block_size: int) -> tuple[list[int], list[list[int]]]:
    """The context's tokens and each candidate's: " " + ending, for GPT-2's BPE attaches the space to the
    following word, as the reference scripts do."""
    ctx = tokenizer.encode(item.ctx)
    endings = [tokenizer.encode(" " + ending) for ending in item.endings]
    for i, end in enumerate(endings):
        if len(end) >= block_size:
            raise GPT2LabError(
                f"{item.where or 'HellaSwag item'}: ending {i} is {len(end)} tokens, which does not fit the "
                f"model's context of {block_size} with any context before it"
            )
    return ctx, endings


def score_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[Item],
    ctx: EvalContext | None = None,
    share_context: bool | None = None,
) -> list[ItemScore]:
    """Per-candidate losses of every item, in the order given (this process only: ctx.rank and
    ctx.world_size are not used here, see `evaluate`). A candidate longer than the model's context keeps
    its ending and the end of the context.

    share_context=False: `ctx.batch_size` items per forward pass, 4 full rows each (the default on
    GPUs, where wide batches are what makes a forward pass efficient);
    share_context=True: an item's context once and its 4 endings after it in one row, `ctx.batch_size`
    items per forward pass (the default on CPUs, which are bound by arithmetic, and this is about half).
    """
    ctx = ctx or EvalContext()
    gpt = unwrap(model)
    check_vocab(gpt, tokenizer)
    share = ctx.device_for(gpt).type == "cpu" if share_context is None else share_context
    block = gpt.config.block_size
    encoded = [_encode(item, tokenizer, block) for item in items]
    # A row is at most block_size tokens, context + ending: a longer one drops the start of its context.
    requests = [(context[max(0, len(context) + len(e) - block) :], e) for context, endings in encoded for e in endings]
    answers = score_requests(
        gpt,
        requests,
        batch_size=ctx.batch_size if share else ctx.batch_size * NUM_ENDINGS,
        share_context=share,
        autocast_dtype=ctx.autocast_dtype,
        progress=ctx.show_progress,
        desc="hellaswag",
    )
    scores = []
    for n, (item, (_, endings)) in enumerate(zip(items, encoded)):
        sums = [-logp for logp, _ in answers[n * NUM_ENDINGS : (n + 1) * NUM_ENDINGS]]
        scores.append(ItemScore(item.label, tuple(sums), tuple(s / len(e) for s, e in zip(sums, endings))))
    return scores


def evaluate(
    model: nn.Module,
    tokenizer,
    items: Sequence[Item],
    ctx: EvalContext | None = None,
    *,
    limit: int | None = None,
) -> HellaSwagResult:
    """HellaSwag accuracy of `model` on the first `limit` items (all when None).

    Callable from a training loop on every rank: rank r scores items r, r + world_size, ... and the
    counts are all-reduced, so every rank returns the same result, whatever the world size. The
    model's train/eval mode is restored afterwards. `ctx.progress` shows a bar on rank 0.
    """
    ctx = ctx or EvalContext()
    if limit is not None and limit < 1:
        raise GPT2LabError(f"limit must be at least 1, got {limit}")
    chosen = list(items[:limit]) if limit is not None else list(items)
    mine = [chosen[i] for i in ctx.mine(len(chosen))]
    scores = score_items(model, tokenizer, mine, ctx)
    counts = torch.tensor(
        [len(scores), sum(s.pred == s.label for s in scores), sum(s.pred_norm == s.label for s in scores)],
        dtype=torch.float64,
    )
    total, correct, correct_norm = (int(v) for v in all_reduce_sum(counts).tolist())
    return HellaSwagResult(total, correct, correct_norm)
