"""The CORE metric of the DCLM paper (Li et al. 2024, arXiv:2406.11794), computed as nanochat's
core_eval.py and base_eval.py compute it, so a gpt2lab model gets the number nanochat would print.

The data is nanochat's `eval_bundle` (eval_bundle.zip, or its unzipped folder):

    core.yaml            icl_tasks: label, dataset_uri, num_fewshot ([k]), icl_task_type, continuation_delimiter
    eval_meta_data.csv   one row per task: "Eval Task" (the label) and "Random baseline" (in percent)
    eval_data/*.jsonl    the items of each task

For each task the items are shuffled with random.Random(1337) (then cut to `limit`, nanochat's
max_per_task); item i gets k few-shot examples drawn by random.Random(1234 + i) from the other items.
Three kinds of task, each rendered exactly as nanochat's templates render it:

    multiple_choice    one prompt per choice; the continuation is the tokens after the choices' common
                       prefix; the choice with the lowest mean loss over them is the answer (item "gold")
    schema             one prompt per context option, all ending in the same continuation (the common
                       suffix); lowest mean loss over it picks the context
    language_modeling  right when greedy decoding (argmax at every position) gives the continuation exactly

Every prompt is encoded with `<|endoftext|>` in front; a row longer than the model's context keeps its
last tokens. nanochat scores a row's tokens [start, end) by the losses at [start - 1, end - 1); a row
whose span is empty, or is cut to fill the whole context (start 0, so that slice is [-1, end - 1), empty
too), has a NaN mean, which `min` never picks unless it comes first. A task's accuracy is centred on
its random baseline b (percent): (acc - b/100) / (1 - b/100), and CORE is the mean of the centred
accuracies.

Under torchrun rank r scores items r, r + W, ... of each task and the right/wrong marks are all-reduced.
"""

from __future__ import annotations

import csv
import io
import os
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..distributed import all_reduce_sum, download_once
from ..errors import GPT2LabError
from ..jsonl import read_jsonl
from ..model import unwrap
from ..runtime import autocast
from .common import EvalContext, EvalResult, check_vocab, evaluating, hidden_at, nll_chunk_rows, token_losses

# Where nanochat downloads its bundle from (core_eval.py / base_eval.py, EVAL_BUNDLE_URL).
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CACHE_NAME = "eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # base_eval.py shuffles each task's items with random.Random(1337)
FEWSHOT_SEED = 1234  # core_eval.py draws item i's examples with random.Random(1234 + i)
METHOD = (
    "DCLM CORE as nanochat's core_eval.py computes it: items shuffled with seed 1337, few-shot examples "
    "drawn with seed 1234 + item index, <|endoftext|> first, rows cut to the model's context from the left; "
    "multiple choice and schema: lowest mean loss over the continuation; language modelling: exact greedy "
    "match; accuracy centred on the task's random baseline, CORE = mean of the centred accuracies"
)


@dataclass(frozen=True)
class TaskSpec:
    """One task of core.yaml, with its random baseline (percent) from eval_meta_data.csv."""

    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    delimiter: str
    random_baseline: float


@dataclass(frozen=True)
class TaskResult:
    """One task's count of right answers, its accuracy and its centred accuracy."""

    label: str
    task_type: str
    num_fewshot: int
    items: int
    correct: int
    random_baseline: float

    @property
    def accuracy(self) -> float:
        # A float32 mean of the 0/1 marks, as nanochat's `correct.mean().item()` gives it.
        return float(np.float32(self.correct) / np.float32(self.items)) if self.items else float("nan")

    @property
    def centered(self) -> float:
        baseline = 0.01 * self.random_baseline
        return (self.accuracy - baseline) / (1.0 - baseline)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.task_type,
            "shots": self.num_fewshot,
            "items": self.items,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "centered": self.centered,
            "random_baseline": self.random_baseline,
        }


@dataclass(frozen=True)
class CoreResult(EvalResult):
    """Every task's result, in core.yaml's order; `core` is the mean of their centred accuracies."""

    tasks: tuple[TaskResult, ...]

    @property
    def core(self) -> float:
        return sum(t.centered for t in self.tasks) / len(self.tasks) if self.tasks else float("nan")

    def metrics(self) -> dict[str, float | int]:
        return {"core": self.core, "core_tasks": len(self.tasks)}

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics(), "per_task": {t.label: t.to_dict() for t in self.tasks}}


# ----------------------------------------------------------------------------- the bundle


class Bundle:
    """nanochat's eval_bundle, read from its zip (in place) or from a folder. Either may hold the files
    at its top or inside one `eval_bundle/` folder, as the published zip does."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            top = self.path if (self.path / "core.yaml").is_file() else self.path / "eval_bundle"
            if not (top / "core.yaml").is_file():
                raise GPT2LabError(f"{self.path} holds no core.yaml (nor eval_bundle/core.yaml); is it an eval_bundle?")
            self.prefix = str(top.relative_to(self.path))
        elif zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            tops = sorted((n for n in self._zip.namelist() if PurePosixPath(n).name == "core.yaml"), key=len)
            if not tops:
                raise GPT2LabError(f"{self.path} holds no core.yaml; is it nanochat's eval_bundle.zip?")
            self.prefix = str(PurePosixPath(tops[0]).parent)
        elif self.path.exists():
            raise GPT2LabError(f"{self.path} is neither a folder nor a zip file; --bundle takes an eval_bundle")
        else:
            raise GPT2LabError(f"eval bundle {self.path} not found; omit --bundle to download nanochat's")

    def read_bytes(self, name: str) -> bytes:
        """The bytes of `name` (a path relative to the bundle's top, with '/')."""
        member = str(PurePosixPath(self.prefix, name)) if self.prefix != "." else name
        try:
            if self._zip is not None:
                return self._zip.read(member)
            return (self.path / member).read_bytes()
        except (KeyError, OSError):
            raise GPT2LabError(f"{self.path}: {name} is missing from the eval bundle") from None

    def tasks(self) -> list[TaskSpec]:
        """The tasks of core.yaml in its order, each with its random baseline."""
        import yaml  # PyYAML comes with huggingface_hub

        try:
            config = yaml.safe_load(self.read_bytes("core.yaml"))
            entries = config["icl_tasks"]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise GPT2LabError(f"{self.path}: core.yaml has no readable icl_tasks list ({e})") from None
        baselines = self.random_baselines()
        specs = []
        for entry in entries:
            try:
                label, task_type = entry["label"], entry["icl_task_type"]
                shots = entry["num_fewshot"]
                spec = TaskSpec(
                    label,
                    task_type,
                    entry["dataset_uri"],
                    int(shots[0] if isinstance(shots, list) else shots),
                    entry.get("continuation_delimiter", " "),
                    baselines.get(label, float("nan")),
                )
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise GPT2LabError(f"{self.path}: core.yaml task {entry!r:.80} is incomplete (missing {e})") from None
            if label not in baselines:
                raise GPT2LabError(f"{self.path}: eval_meta_data.csv has no random baseline for task {label!r}")
            if task_type not in TASK_TYPES:
                raise GPT2LabError(
                    f"{self.path}: task {label!r} has type {task_type!r}; known: {', '.join(TASK_TYPES)}"
                )
            specs.append(spec)
        return specs

    def random_baselines(self) -> dict[str, float]:
        """Label -> random baseline in percent, from eval_meta_data.csv."""
        text = self.read_bytes("eval_meta_data.csv").decode("utf-8")
        try:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(io.StringIO(text))}
        except (KeyError, ValueError) as e:
            raise GPT2LabError(
                f"{self.path}: eval_meta_data.csv needs 'Eval Task' and 'Random baseline' ({e})"
            ) from None

    def items(self, spec: TaskSpec, limit: int | None = None) -> list[dict[str, Any]]:
        """A task's items in nanochat's order: shuffled with random.Random(1337), then the first `limit`."""
        name = f"eval_data/{spec.dataset_uri}"
        data = self.read_bytes(name).splitlines(keepends=True)
        items = [line.record for line in read_jsonl(data, name, f"one {spec.task_type} item") if not line.blank]
        random.Random(SHUFFLE_SEED).shuffle(items)
        return items[:limit] if limit is not None else items


def bundle_path(bundle: str | os.PathLike | None = None, rank: int = 0) -> Path:
    """`bundle` if given, else nanochat's eval_bundle.zip, downloaded once into gpt2lab's cache (rank 0
    downloads while the other ranks wait)."""
    if bundle is not None:
        return Path(bundle).expanduser()
    return download_once(EVAL_BUNDLE_URL, CACHE_NAME, rank)


# ----------------------------------------------------------------------------- prompts


def fewshot_examples(items: Sequence[dict[str, Any]], index: int, shots: int) -> list[dict[str, Any]]:
    """The examples shown before item `index`: `shots` other items, drawn by random.Random(1234 + index)
    (fewer when the task has fewer other items)."""
    if shots <= 0:
        return []
    others = [i for i in range(len(items)) if i != index]
    return [items[i] for i in random.Random(FEWSHOT_SEED + index).sample(others, min(shots, len(others)))]


# The three renderings below give the strings nanochat's jinja templates give: each example is
# "<shown>" + delimiter + "<answer>" + "\n\n", then the item itself, values as str().


def render_multiple_choice(item: dict[str, Any], delimiter: str, shots: Sequence[dict[str, Any]]) -> list[str]:
    """One prompt per choice: examples with their right choice, then the query and that choice."""
    head = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
    return [f"{head}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict[str, Any], delimiter: str, shots: Sequence[dict[str, Any]]) -> list[str]:
    """One prompt per context option, each followed by the item's continuation."""
    head = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in shots)
    return [f"{head}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_language_modeling(item: dict[str, Any], delimiter: str, shots: Sequence[dict[str, Any]]) -> list[str]:
    """Two prompts, without and with the continuation; contexts are stripped of surrounding whitespace
    (jinja's `trim`), and so is the whole prompt without the continuation, so that it is a clean prefix."""
    head = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in shots)
    without = f"{head}{str(item['context']).strip()}{delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


RENDER = {
    "multiple_choice": render_multiple_choice,
    "schema": render_schema,
    "language_modeling": render_language_modeling,
}


def common_length(rows: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Length of the prefix (or with `from_end` the suffix) that all rows share."""
    shortest = min(len(r) for r in rows)
    for n in range(shortest):
        pos = -1 - n if from_end else n
        if any(r[pos] != rows[0][pos] for r in rows):
            return n
    return shortest


@dataclass(frozen=True)
class Prepared:
    """One item as token rows, each with the span [start, end) of tokens that is scored."""

    rows: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]  # 0 where the span fills the whole (cut) row: nothing is scored there
    ends: tuple[int, ...]
    gold: int  # the right row (multiple choice, schema); -1 for language modelling


def prepare(items: Sequence[dict[str, Any]], index: int, spec: TaskSpec, tokenizer, block_size: int) -> Prepared:
    """Item `index` of a task rendered, tokenized with <|endoftext|> first, its scored spans found and
    its rows cut to `block_size` tokens from the left. A multiple-choice or schema row whose span is cut
    to start at 0 stays (nanochat gives it a NaN mean); a span longer than the context, or a language-
    modelling continuation that fills it, is an error (nanochat's assertion or shape mismatch)."""
    item, where = items[index], f"{spec.label} item {index}"
    try:
        prompts = RENDER[spec.task_type](item, spec.delimiter, fewshot_examples(items, index, spec.num_fewshot))
        gold = int(item["gold"]) if spec.task_type != "language_modeling" else -1
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise GPT2LabError(f"{where}: not a {spec.task_type} item ({type(e).__name__}: {e})") from None
    rows = [[tokenizer.eot_token, *tokenizer.encode(p)] for p in prompts]
    ends = [len(r) for r in rows]
    if spec.task_type == "multiple_choice":
        starts = [common_length(rows)] * len(rows)
    elif spec.task_type == "schema":
        suffix = common_length(rows, from_end=True)
        starts = [e - suffix for e in ends]
    else:
        without, with_continuation = rows
        if len(without) >= len(with_continuation) or with_continuation[: len(without)] != without:
            raise GPT2LabError(f"{where}: the prompt without its continuation does not tokenize as a prefix of it")
        rows, starts, ends = [with_continuation], [len(without)], [len(with_continuation)]
    cut = [max(0, len(r) - block_size) for r in rows]
    least = 1 if spec.task_type == "language_modeling" else 0
    if any(s - c < least for s, c in zip(starts, cut)):
        raise GPT2LabError(f"{where}: nothing before its continuation fits the model's context of {block_size}")
    return Prepared(
        tuple(tuple(r[c:]) for r, c in zip(rows, cut)),
        tuple(s - c for s, c in zip(starts, cut)),
        tuple(e - c for e, c in zip(ends, cut)),
        gold,
    )


# ----------------------------------------------------------------------------- scoring


def _losses_and_predictions(
    gpt: nn.Module, batch: Sequence[Prepared], device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All rows of `batch` in one forward pass, right-padded with <|endoftext|> (causal attention keeps
    padding away from the scored positions). Returns, for every scored position in row-major order,
    (N,) each: its row, its loss (float32), the argmax prediction, and the token it predicts."""
    rows = [r for p in batch for r in p.rows]
    pad = rows[0][0]
    idx = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)  # (R, T)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r)
    starts = torch.tensor([s for p in batch for s in p.starts])  # (R,)
    ends = torch.tensor([e for p in batch for e in p.ends])  # (R,)
    pos = torch.arange(idx.size(1))  # (T,)
    # Position p predicts token p + 1: the tokens [start, end) are predicted at [start - 1, end - 1); a row
    # whose span starts at 0 scores nothing (nanochat's slice [-1, end - 1) is empty).
    scored = (pos >= (starts - 1).unsqueeze(1)) & (pos < (ends - 1).unsqueeze(1)) & (starts > 0).unsqueeze(1)  # (R, T)
    r, c = scored.nonzero(as_tuple=True)  # (N,) each
    targets = idx[r, c + 1].to(device)  # (N,)
    idx, r_dev, c_dev = idx.to(device), r.to(device), c.to(device)
    losses = torch.empty(r.numel(), dtype=torch.float32, device=device)  # (N,)
    predictions = torch.empty(r.numel(), dtype=torch.long, device=device)  # (N,)
    with autocast(device, autocast_dtype):
        hidden = hidden_at(gpt, idx, r_dev, c_dev)  # (N, C)
        step = nll_chunk_rows(device)
        for a in range(0, r.numel(), step):
            logits = gpt.head(hidden[a : a + step])  # (n, V)
            losses[a : a + step] = token_losses(logits, targets[a : a + step])
            predictions[a : a + step] = logits.argmax(dim=-1)
    return r, losses.cpu(), predictions.cpu(), targets.cpu()


def score_batch(
    gpt: nn.Module,
    batch: Sequence[Prepared],
    task_type: str,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> list[bool]:
    """Whether each item of `batch` is answered right: for multiple choice and schema the row with the
    lowest mean loss over its span is the gold one (the first such row on a tie; a row whose span is
    empty or starts at 0 has a NaN mean, as nanochat gets it); for language modelling every argmax is the
    next token."""
    r, losses, predictions, targets = _losses_and_predictions(gpt, batch, device, autocast_dtype)
    out, row = [], 0
    for p in batch:
        if task_type == "language_modeling":
            mine = r == row
            out.append(bool(torch.equal(predictions[mine], targets[mine])))
        else:
            means = [losses[r == row + i].mean().item() for i in range(len(p.rows))]
            out.append(means.index(min(means)) == p.gold)
        row += len(p.rows)
    return out


def evaluate_task(
    model: nn.Module, tokenizer, spec: TaskSpec, items: Sequence[dict[str, Any]], ctx: EvalContext, bar=None
) -> TaskResult:
    """One task: rank r scores items r, r + W, ... in batches of ctx.batch_size items; the right/wrong
    marks are all-reduced, so every rank returns the same result."""
    gpt = unwrap(model)
    device = ctx.device_for(gpt)
    marks = torch.zeros(len(items), dtype=torch.float64, device=device)  # (n,)
    mine = ctx.mine(len(items))
    with evaluating(gpt):
        for a in range(0, len(mine), ctx.batch_size):
            chunk = mine[a : a + ctx.batch_size]
            batch = [prepare(items, i, spec, tokenizer, gpt.config.block_size) for i in chunk]
            right = score_batch(gpt, batch, spec.task_type, device, ctx.autocast_dtype)
            marks[torch.tensor(chunk, device=device)] = torch.tensor(right, dtype=torch.float64, device=device)
            if bar is not None:
                bar.update(len(chunk))
    correct = int(all_reduce_sum(marks).sum().item())
    return TaskResult(spec.label, spec.task_type, spec.num_fewshot, len(items), correct, spec.random_baseline)


def evaluate(
    model: nn.Module, tokenizer, bundle: Bundle, ctx: EvalContext | None = None, *, limit: int | None = None
) -> CoreResult:
    """CORE of `model` over every task of `bundle` (the first `limit` shuffled items of each when given,
    nanochat's max_per_task). Callable on every rank; the model's train/eval mode is restored after."""
    ctx = ctx or EvalContext()
    if limit is not None and limit < 1:
        raise GPT2LabError(f"limit must be at least 1, got {limit}")
    check_vocab(unwrap(model), tokenizer)
    tasks = [(spec, bundle.items(spec, limit)) for spec in bundle.tasks()]
    from tqdm.auto import tqdm

    total = sum(len(ctx.mine(len(items))) for _, items in tasks)
    with tqdm(total=total, desc="core", unit="item", disable=not ctx.show_progress, leave=False) as bar:
        results = tuple(evaluate_task(model, tokenizer, spec, items, ctx, bar) for spec, items in tasks)
    return CoreResult(results)
