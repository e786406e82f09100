"""What the loop evaluates every `eval.every` steps, and the hook where evaluations plug in.

Validation loss and HellaSwag are gpt2lab.eval's own functions, called with the loop's EvalContext:
the val split's first `eval.val_tokens` tokens, cut into fixed windows that every rank count shares, so
the number is the same for one process or eight. A short sample from a fixed prompt and seed shows
progress in words; the prompt is eval.sample_prompt, or with "auto" the data's first words (`data_prompt`).

Any other evaluation is an `EvalTask`: a callable run on every rank with the (possibly DDP- or
compile-wrapped) model and the EvalContext (its `step`, `tokenizer` and `seq_len` filled in by the
loop), returning a flat dict of numbers for metrics.jsonl, e.g.

    def my_task(model, ctx):
        return {"my_accuracy": 0.42}
    train(cfg, eval_tasks=[my_task])

Named tasks (`eval.tasks = ["hellaswag"]` in a config) are listed in NAMED_TASKS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from .. import accel
from ..chat import ChatTemplate
from ..data import open_split_tokens
from ..data.shards import TokenSequence
from ..errors import GPT2LabError
from ..eval.common import EvalContext
from ..generate import SamplingParams, generate
from ..model import GPT
from ..runtime import rng_state, set_rng_state
from ..tokenizer import Tokenizer
from .config import SAMPLE_PROMPT_FROM_DATA

__all__ = [
    "NAMED_TASKS",
    "EvalContext",
    "EvalTask",
    "Evaluator",
    "data_prompt",
    "describe",
    "sample_prompt",
    "sample_text",
    "split_if_any",
]

EvalTask = Callable[[nn.Module, EvalContext], dict[str, float]]

NAMED_TASKS = ("hellaswag",)
# A prompt taken from the data keeps a few words of it: enough to set the scene, short enough to leave the
# sample to the model.
PROMPT_TOKENS = 8
PROMPT_SEARCH_TOKENS = 1024  # where its first line is looked for


class Evaluator:
    """Runs the val loss, the named tasks and any EvalTasks; the same dict comes back on every rank.

    Global RNG states are saved before and restored after, so evaluating never changes what the
    training steps draw (a resumed run evaluates at other steps than an unbroken one may have).
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: Tokenizer,
        val_tokens: int,
        tasks: Sequence[str],
        extra: Sequence[EvalTask],
        rank: int,
        world_size: int,
        chat_val: Any = None,
    ) -> None:
        """chat_val: the val split's rows (a data.chat_loader.ChatLoader) when training on chat data,
        whose val loss is then over the assistant's replies alone, as the training loss."""
        from ..eval.val_loss import open_val_tokens

        unknown = [t for t in tasks if t not in NAMED_TASKS]
        if unknown:
            raise GPT2LabError(f"eval.tasks: unknown task {unknown[0]!r}; available: {', '.join(NAMED_TASKS)}")
        self.tokenizer = tokenizer
        self.val_tokens = val_tokens
        self.val_data = open_val_tokens(data_dir, tokenizer) if val_tokens > 0 else None
        self.chat_val = chat_val
        self.hellaswag_items = None
        if "hellaswag" in tasks:
            from ..eval import hellaswag

            # Rank 0 downloads the file once, the others wait for it.
            self.hellaswag_items = hellaswag.load_validation(rank=rank, world_size=world_size)
        self.extra = list(extra)

    def __call__(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        from ..eval import hellaswag
        from ..eval.val_loss import chat_val_loss, val_loss

        saved = rng_state()
        try:
            metrics: dict[str, Any] = {}
            if self.chat_val is not None:
                metrics.update(chat_val_loss(model, self.chat_val, ctx, max_tokens=self.val_tokens).metrics())
            elif self.val_data is not None:
                result = val_loss(model, self.val_data, ctx, max_tokens=self.val_tokens, seq_len=ctx.seq_len)
                metrics.update(result.metrics())
            if self.hellaswag_items is not None:
                metrics.update(hellaswag.evaluate(model, self.tokenizer, self.hellaswag_items, ctx).metrics())
            for task in self.extra:
                metrics.update(task(model, ctx))
        finally:
            set_rng_state(saved)
        return metrics


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int, chat: ChatTemplate | None = None
) -> str:
    """A continuation of `prompt` (temperature 0.8, top-k 200, fixed seed), decoded; with a chat template,
    the reply to `prompt` as a user's first message, up to (without) `<|end|>`. The model's mode is
    restored and the global RNGs are not touched (generation has its own generator)."""
    was_training = model.training
    model.eval()
    stop = chat.end_id if chat is not None else None
    try:
        if chat is not None:
            ids = chat.prompt_ids([{"role": "user", "content": prompt}], tokenizer)
        else:
            ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_token]
        sampling = SamplingParams(temperature=0.8, top_k=200, seed=seed, stop_token=stop)
        out = generate(model, ids, max_new_tokens, sampling=sampling)
    finally:
        accel.unpack(model)  # generate may have packed weights for decoding; training runs on the plain ones
        model.train(was_training)
    tokens = out.tokens[0]
    return tokenizer.decode(tokens[:-1] if stop is not None and tokens[-1:] == [stop] else tokens)


def split_if_any(data_dir: str, split: str, tokenizer: Tokenizer) -> TokenSequence | None:
    """The `split` of a prepared directory, or None where it has none."""
    try:
        return open_split_tokens(data_dir, split, tokenizer)
    except GPT2LabError:
        return None


def sample_prompt(
    prompt: str, val: TokenSequence | None, train: TokenSequence, tokenizer: Tokenizer, chat: ChatTemplate | None = None
) -> str:
    """eval.sample_prompt as the loop samples from it: the text given, or for "auto" the first words of
    the val split (of the train split where there is no val split); with a chat template, for "auto",
    the first user message there."""
    if prompt != SAMPLE_PROMPT_FROM_DATA:
        return prompt
    tokens = val if val is not None else train
    return first_user_message(tokens, tokenizer, chat) if chat is not None else data_prompt(tokens, tokenizer)


def first_user_message(tokens: Any, tokenizer: Tokenizer, chat: ChatTemplate) -> str:
    """The text of the first user message in the first PROMPT_SEARCH_TOKENS of chat data; "" if none."""
    ids = [int(t) for t in tokens[:PROMPT_SEARCH_TOKENS]]
    user = chat.role_ids["user"]
    if user not in ids:
        return ""
    start = ids.index(user) + 1
    end = ids.index(chat.end_id, start) if chat.end_id in ids[start:] else len(ids)
    return tokenizer.decode(ids[start:end])


def data_prompt(tokens: Any, tokenizer: Tokenizer) -> str:
    """A sample prompt from the data (eval.sample_prompt = "auto"): the first non-blank line of the first
    document in `tokens` (a split's TokenSequence, an array or a list of ids, read from its start), cut at
    a word boundary after at most PROMPT_TOKENS tokens; "" (a new document) where they hold no text."""
    ids = [int(t) for t in tokens[:PROMPT_SEARCH_TOKENS]]
    documents: list[list[int]] = [[]]
    for token in ids:  # prepared documents begin with <|endoftext|>
        if token == tokenizer.eot_token:
            documents.append([])
        else:
            documents[-1].append(token)
    lines = (line.strip() for doc in documents for line in tokenizer.decode(doc).splitlines())
    line = next((line for line in lines if line), "")
    words = tokenizer.encode_ordinary(line)
    if len(words) <= PROMPT_TOKENS:
        return line
    cut = tokenizer.decode(words[:PROMPT_TOKENS]).rstrip("\ufffd")
    head, space, _ = cut.rpartition(" ")
    return (head if space and head.strip() else cut).rstrip()


def describe(metrics: dict[str, Any]) -> str:
    """One line for the terminal: "val loss 3.2904 | hellaswag_acc_norm 0.2955"."""
    parts = []
    for key, value in metrics.items():
        if key == "val_loss":
            parts.append(f"val loss {value:.4f}")
        elif isinstance(value, float) and key not in ("val_tokens",):
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
