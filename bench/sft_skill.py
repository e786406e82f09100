"""Proof that chat fine-tuning teaches what it should, on a CPU in a few minutes: reversing letters.

A tiny GPT is pretrained briefly on Tiny Shakespeare (with a 512-token BPE trained on it), which
teaches it English-ish text and nothing of the task. It is then fine-tuned on synthetic
conversations in which the user quotes a line (of Tiny Shakespeare) and asks for letters reversed,

    user: "Thou art a boy of Cupid's butt-shaft.\\nreverse: q w e r"     assistant: "r e w q"

as chat data so often holds prompts longer than their replies (--no-quote: the request alone).
It is fine-tuned three ways from the same weights, with the same steps, rows per step, learning rate
and seed: with the loss on the assistant's replies only (train.loss = "assistant": rows from
conversation starts, packed best-fit, masked targets); on the same rows with every token a target (the
data's masks set to 1); and with train.loss = "all" (windows anywhere in the stream, every token a
target). Held-out letter sequences (none of them in the training conversations) are answered greedily
from `ChatTemplate.prompt_ids` until `<|end|>` and scored by exact match of the reply; the base model
(its vocabulary grown by the chat tokens, as fine-tuning starts) is scored the same way. Also printed:
the loss on the val split's learned tokens (the replies), the same measure for every run, and the
share of replies in the user's voice (that ask to "reverse", as only the user's messages do).

    python bench/sft_skill.py                      # the numbers in docs/training.md
    python bench/sft_skill.py --steps 300 --json out.json

Run it on a quiet machine for the timings; the accuracies do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # bench/machine.py, beside this script

from gpt2lab import checkpoint as ckpt
from gpt2lab.chat import ChatTemplate
from gpt2lab.data import data_tokenizer, shards
from gpt2lab.data.chat_loader import open_chat_loader
from gpt2lab.data.prepare import PrepareOptions, prepare
from gpt2lab.eval.val_loss import chat_val_loss
from gpt2lab.fileio import atomic_write_text
from gpt2lab.generate import SamplingParams, generate
from gpt2lab.model import GPT
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.tokenizer_train import save_trained, train_bpe
from gpt2lab.train import train
from gpt2lab.train.build import pretrained_model
from gpt2lab.train.config import TrainConfig

SHAKESPEARE = Path(__file__).resolve().parents[1] / "src" / "gpt2lab" / "data" / "tinyshakespeare.txt.gz"
SHAPE = {"preset": "gpt-nano", "n_layer": 4, "n_head": 4, "n_embd": 128}
SYSTEM = "You reverse the letters you are given."


@dataclass(frozen=True)
class Question:
    """One instance of the task: the letters to reverse, the line the user quotes first ("" for none),
    whether a system prompt opens the conversation."""

    seq: tuple[str, ...]
    quote: str = ""
    system: bool = False

    @property
    def answer(self) -> str:
        return " ".join(reversed(self.seq))

    def messages(self, with_reply: bool) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": SYSTEM}] if self.system else []
        ask = "reverse: " + " ".join(self.seq)
        messages.append({"role": "user", "content": f"{self.quote}\n{ask}" if self.quote else ask})
        if with_reply:
            messages.append({"role": "assistant", "content": self.answer})
        return messages


def task_data(n_train: int, n_test: int, seed: int, quotes: list[str]) -> tuple[list[Question], list[Question]]:
    """Training and held-out questions whose letter sequences are disjoint; 3 to 6 letters, a system
    prompt one time in four, and with `quotes`, one of them before each request."""
    rng = random.Random(seed)

    def draw() -> Question:
        seq = tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        return Question(seq, rng.choice(quotes) if quotes else "", rng.random() < 0.25)

    test: dict[tuple[str, ...], Question] = {}
    while len(test) < n_test:
        q = draw()
        test.setdefault(q.seq, q)
    train_questions: list[Question] = []
    while len(train_questions) < n_train:
        q = draw()
        if q.seq not in test:
            train_questions.append(q)
    return train_questions, list(test.values())


def run_config(data: Path, out: Path, steps: int, **train_keys) -> TrainConfig:
    """A 4-layer, 128-wide GPT on rows of 64 tokens, 32 rows a step, float32 on the CPU."""
    return TrainConfig.from_dict(
        {
            "model": {}
            if "init_from" in train_keys
            else {"preset": "gpt-nano", "n_layer": 4, "n_head": 4, "n_embd": 128},
            "data": {"dir": str(data)},
            "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.0},
            "train": {
                "out_dir": str(out),
                "batch_size": 32,
                "seq_len": 64,
                "total_batch_tokens": 2048,
                "max_steps": steps,
                "precision": "fp32",
                "device": "cpu",
                "seed": 1337,
                **train_keys,
            },
            "eval": {"every": 0, "val_tokens": 4096, "sample_tokens": 0},
            "checkpoint": {"every": 0, "keep_last": 1},
        }
    )


def reply(model: GPT, tok: Tokenizer, template: ChatTemplate, question: Question) -> str:
    """The greedy reply to `question`, decoded up to (without) `<|end|>`."""
    ids = template.prompt_ids(question.messages(with_reply=False), tok)
    out = generate(
        model, ids, 2 * len(question.seq) + 4, sampling=SamplingParams(temperature=0.0, stop_token=template.end_id)
    )
    tokens = out.tokens[0]
    return tok.decode(tokens[:-1] if tokens and tokens[-1] == template.end_id else tokens)


def score(model: GPT, tok: Tokenizer, test: list[Question]) -> dict[str, float | str]:
    """Exact-match accuracy of the replies, and the share that speak in the user's voice (that ask to
    reverse, as only the user's messages do)."""
    template = ChatTemplate.for_tokenizer(tok)
    model.eval()
    with torch.inference_mode():
        replies = [reply(model, tok, template, q) for q in test]
    exact = sum(r.strip() == q.answer for r, q in zip(replies, test))
    user_voice = sum("reverse" in r for r in replies)
    return {"exact": exact / len(test), "user_voice": user_voice / len(test), "example": replies[0]}


def prepare_all(root: Path, n_train: int, n_test: int, seed: int, quote: bool) -> tuple[Path, Path, list[Question]]:
    """The tokenizer, Tiny Shakespeare's shards and the task's chat shards, all with that tokenizer;
    with `quote`, each request follows a line of Tiny Shakespeare (5 to 60 characters)."""
    text = gzip.decompress(SHAKESPEARE.read_bytes()).decode("utf-8")
    (root / "shakespeare.txt").write_text(text, encoding="utf-8")
    save_trained(train_bpe([text], 512, progress=False), root / "tok")
    common = dict(workers=1, progress=False, tokenizer=str(root / "tok"))
    prepare(PrepareOptions(source=str(root / "shakespeare.txt"), out=root / "text", val_tokens=8192, **common))
    lines = sorted({line.strip() for line in text.splitlines() if 5 <= len(line.strip()) <= 60}) if quote else []
    train_questions, test = task_data(n_train, n_test, seed, lines)
    with open(root / "chat.jsonl", "w", encoding="utf-8") as f:
        for q in train_questions:
            f.write(json.dumps({"messages": q.messages(with_reply=True)}) + "\n")
    prepare(PrepareOptions(source=str(root / "chat.jsonl"), out=root / "chat", val_tokens=8192, **common))
    return root / "text", root / "chat", test


def every_token_copy(chat_dir: Path, out: Path) -> Path:
    """`chat_dir` with every loss mask set to 1: the same rows, packing and order under the chat loss,
    but every token a target (the user's side and the template's tokens too), to isolate the mask."""
    shutil.copytree(chat_dir, out)
    manifest = json.loads((out / shards.MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest["shards"]:
        _, entry["mask_sha256"] = shards.write_mask(out / entry["mask"], np.ones(entry["tokens"], dtype=np.uint8))
    atomic_write_text(out / shards.MANIFEST_NAME, json.dumps(manifest, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps on Tiny Shakespeare (default 300)")
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps of each run (default 600)")
    p.add_argument("--train-conversations", type=int, default=20000)
    p.add_argument("--test", type=int, default=200, help="held-out questions (default 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="the task data's seed")
    p.add_argument(
        "--no-quote", dest="quote", action="store_false", help="bare requests, without a quoted line before them"
    )
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_dir, chat_dir, test = prepare_all(root, args.train_conversations, args.test, args.seed, args.quote)
        t0 = time.perf_counter()
        train(run_config(text_dir, root / "base", args.pretrain_steps), progress=False)
        print(f"pretrained on Tiny Shakespeare: {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s")
        # The base model as fine-tuning starts from it: its own shape, the chat tokens' rows added.
        chat_tok = data_tokenizer(chat_dir)
        base_cfg = run_config(chat_dir, root / "unused", 1, init_from=str(root / "base"), loss="assistant")
        results["base"] = score(pretrained_model(base_cfg, chat_tok), chat_tok, test)
        # The same weights fine-tuned three ways: the chat loss; the same rows with every token a target;
        # plain language-model training on the same tokens (train.loss = "all": windows anywhere).
        runs = {
            "assistant": (chat_dir, "assistant"),
            "rows-every-token": (root / "every", "assistant"),
            "all": (chat_dir, "all"),
        }
        every_token_copy(chat_dir, root / "every")
        val_rows = open_chat_loader(chat_dir, "val", batch_size=1, seq_len=64)
        results["base"]["reply_loss"] = chat_val_loss(
            pretrained_model(base_cfg, chat_tok), val_rows, max_tokens=8192
        ).loss
        for name, (data, loss) in runs.items():
            t0 = time.perf_counter()
            cfg = run_config(data, root / f"sft-{name}", args.steps, init_from=str(root / "base"), loss=loss)
            done = train(cfg, progress=False)
            seconds = time.perf_counter() - t0
            model, tok = ckpt.load_model_and_tokenizer(str(done.checkpoint))
            reply_loss = chat_val_loss(model, val_rows, max_tokens=8192).loss
            results[name] = {**score(model, tok, test), "reply_loss": reply_loss, "seconds": seconds}
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; {args.test} held-out questions, greedy replies")
    names = {
        "base": "base model (no fine-tuning)",
        "assistant": "train.loss = assistant",
        "rows-every-token": "same rows, every token",
        "all": "train.loss = all",
    }
    for key, r in results.items():
        took = f", trained in {r['seconds']:.0f} s" if "seconds" in r else ""
        print(
            f"  {names[key]:<28} exact match {r['exact']:6.1%}   user's voice {r['user_voice']:6.1%}   "
            f"reply loss {r['reply_loss']:.3f}{took}   e.g. {r['example']!r}"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args) | {"json": str(args.json)}, **results}))


if __name__ == "__main__":
    main()
