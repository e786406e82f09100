"""Talk to a chat model in the terminal, each reply streamed as it is generated.

The model must have been fine-tuned on conversations (its checkpoint records a chat template;
docs/training.md). Type a message and press Enter; /clear starts a new conversation (keeping --system),
/exit, Ctrl-D or Ctrl-C ends. When the conversation outgrows the model's context, its oldest turns are
dropped (the system prompt stays) so that the reply keeps room for --max-new-tokens, at most half the
context. Reply k of a session (from 0) is sampled with seed + k, so the same --seed and the same
messages replay a conversation exactly.

Examples:
  gpt2lab chat --model runs/sft
  gpt2lab chat --model runs/sft --system "You answer in one sentence." --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from ..errors import GPT2LabError
from .sample import add_sampling_arguments, check_sampling, load_for_generation, sampling_params

if TYPE_CHECKING:  # the chat template's module is light, but the model's needs torch: loaded in run
    from ..chat import ChatTemplate
    from ..model import GPT
    from ..tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a gpt2lab checkpoint or run dir fine-tuned on conversations (its checkpoint records the chat template)",
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="a system prompt that opens the conversation")
    add_sampling_arguments(p)


Message = dict[str, str]


def fit_history(
    messages: Sequence[Message], template: ChatTemplate, tokenizer: Tokenizer, budget: int
) -> list[Message] | None:
    """The conversation with as few of its oldest turns dropped as it takes for its prompt (the ids the
    reply is generated after) to be at most `budget` tokens. A turn is a user message and what follows it
    up to the next one; a leading system message always stays. None when even the last turn alone does
    not fit."""
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    rest = list(messages[len(system) :])
    while len(template.prompt_ids(system + rest, tokenizer)) > budget:
        starts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not starts:
            return None
        rest = rest[starts[0] :]
    return system + rest


def _read_line(inp: TextIO, interactive: bool) -> str | None:
    """The user's next line, or None at the end of the input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = inp.readline()
    return line.rstrip("\n") if line else None


def converse(
    model: GPT,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    args: argparse.Namespace,
    seed: int,
    inp: TextIO,
    out: TextIO,
) -> None:
    """The conversation loop: read a message, stream the reply to `out`, until /exit or the input ends."""
    from ..generate import stream_text

    context = model.config.block_size
    budget = context - min(args.max_new_tokens, context // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[Message] = list(system)
    replies = 0
    interactive = inp.isatty()
    while (line := _read_line(inp, interactive)) is not None:
        text = line.strip()
        if text == "/exit":
            return
        if text == "/clear":
            history = list(system)
            print("(a new conversation)", file=sys.stderr)
            continue
        if not text:
            continue
        messages = fit_history([*history, {"role": "user", "content": line}], template, tokenizer, budget)
        if messages is None:
            print(
                f"(that message is too long: the model's context is {context} tokens and the reply keeps "
                f"{context - budget} of them; shorten it)",
                file=sys.stderr,
            )
            continue
        if len(messages) <= len(history):
            print("(the oldest turns no longer fit in the model's context and were dropped)", file=sys.stderr)
        prompt = template.prompt_ids(messages, tokenizer)
        sampling = sampling_params(args, seed + replies, tokenizer.eot_token)
        max_new = min(args.max_new_tokens, context - len(prompt))
        reply = ""
        for piece in stream_text(model, tokenizer, prompt, max_new, sampling=sampling, end_tokens=(template.end_id,)):
            out.write(piece)
            out.flush()
            reply += piece
        out.write("\n\n" if interactive else "\n")
        out.flush()
        history = [*messages, {"role": "assistant", "content": reply}]
        replies += 1


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    from ..chat import template_of

    device, model, tok = load_for_generation(args)
    template = template_of(tok)
    if template is None:
        raise GPT2LabError(f"{args.model} has no chat template: fine-tune it on conversations first (docs/training.md)")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    try:
        print(
            f"gpt2lab chat: {args.model} on {device.type}, {model.config.block_size}-token context, seed {seed}; "
            "/clear starts over, /exit or Ctrl-D ends",
            file=sys.stderr,
            flush=True,
        )
        converse(model, tok, template, args, seed, sys.stdin, sys.stdout)
    except KeyboardInterrupt:  # Ctrl-C ends the conversation as /exit does
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
