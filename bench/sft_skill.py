"""Proof that chat fine-tuning teaches what it should, on a CPU in a few minutes: reversing letters.

A tiny GPT is pretrained briefly on Tiny Shakespeare (with a 512-token BPE trained on it), which
teaches it English-ish text and nothing of the task. It is then fine-tuned on synthetic
conversations

    user: "reverse: q w e r"        assistant: "r e w q"

twice from the same weights, with the same steps, batch, learning rate and seed: once with the loss on
the assistant's replies only (train.loss = "assistant": rows from conversation starts, packed best-fit,
masked targets) and once with the loss on every token of the same data (train.loss = "all"). Held-out
letter sequences (none of them in the training conversations) are answered greedily from
`ChatTemplate.prompt_ids` until `<|end|>` and scored by exact match of the reply; the base model (its
vocabulary grown by the chat tokens, as fine-tuning starts) is scored the same way. Besides exact
matches, the replies that speak in the user's voice (that start as a user's message does, "reverse")
are counted.

    python bench/sft_skill.py                      # the numbers in docs/training.md
    python bench/sft_skill.py --steps 300 --json out.json

Run it on a quiet machine for the timings; the accuracies do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # bench/machine.py, beside this script

from gpt2lab import checkpoint as ckpt
from gpt2lab.chat import ChatTemplate
from gpt2lab.data import data_tokenizer
from gpt2lab.data.prepare import PrepareOptions, prepare
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


def letters(rng: random.Random) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))]


def conversation(seq: list[str], rng: random.Random | None = None) -> list[dict[str, str]]:
    """The task as a conversation; with `rng`, a system prompt one time in four (and the reply)."""
    messages = [{"role": "system", "content": SYSTEM}] if rng is not None and rng.random() < 0.25 else []
    messages.append({"role": "user", "content": "reverse: " + " ".join(seq)})
    if rng is not None:
        messages.append({"role": "assistant", "content": " ".join(reversed(seq))})
    return messages


def task_data(n_train: int, n_test: int, seed: int) -> tuple[list[list[dict[str, str]]], list[list[str]]]:
    """Training conversations and held-out letter sequences, disjoint."""
    rng = random.Random(seed)
    test: list[list[str]] = []
    seen: set[str] = set()
    while len(test) < n_test:
        seq = letters(rng)
        if "".join(seq) not in seen:
            seen.add("".join(seq))
            test.append(seq)
    train_convs = []
    while len(train_convs) < n_train:
        seq = letters(rng)
        if "".join(seq) not in seen:
            train_convs.append(conversation(seq, rng))
    return train_convs, test


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


def reply(model: GPT, tok: Tokenizer, template: ChatTemplate, seq: list[str]) -> str:
    """The greedy reply to the task's question, decoded up to (without) `<|end|>`."""
    ids = template.prompt_ids(conversation(seq), tok)
    out = generate(model, ids, 2 * len(seq) + 4, sampling=SamplingParams(temperature=0.0, stop_token=template.end_id))
    tokens = out.tokens[0]
    return tok.decode(tokens[:-1] if tokens and tokens[-1] == template.end_id else tokens)


def score(model: GPT, tok: Tokenizer, test: list[list[str]]) -> dict[str, float]:
    """Exact-match accuracy of the replies, and the share that start in the user's voice."""
    template = ChatTemplate.for_tokenizer(tok)
    model.eval()
    with torch.inference_mode():
        replies = [reply(model, tok, template, seq) for seq in test]
    exact = sum(r.strip() == " ".join(reversed(seq)) for r, seq in zip(replies, test))
    user_voice = sum(r.strip().startswith("reverse") for r in replies)
    return {"exact": exact / len(test), "user_voice": user_voice / len(test), "example": replies[0]}


def prepare_all(root: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path, list[list[str]]]:
    """The tokenizer, Tiny Shakespeare's shards and the task's chat shards, all with that tokenizer."""
    text = gzip.decompress(SHAKESPEARE.read_bytes()).decode("utf-8")
    (root / "shakespeare.txt").write_text(text, encoding="utf-8")
    save_trained(train_bpe([text], 512, progress=False), root / "tok")
    common = dict(workers=1, progress=False, tokenizer=str(root / "tok"))
    prepare(PrepareOptions(source=str(root / "shakespeare.txt"), out=root / "text", val_tokens=8192, **common))
    train_convs, test = task_data(n_train, n_test, seed)
    with open(root / "chat.jsonl", "w", encoding="utf-8") as f:
        for messages in train_convs:
            f.write(json.dumps({"messages": messages}) + "\n")
    prepare(PrepareOptions(source=str(root / "chat.jsonl"), out=root / "chat", val_tokens=8192, **common))
    return root / "text", root / "chat", test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps on Tiny Shakespeare (default 300)")
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps of each run (default 600)")
    p.add_argument("--train-conversations", type=int, default=20000)
    p.add_argument("--test", type=int, default=200, help="held-out questions (default 200)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="the task data's seed")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_dir, chat_dir, test = prepare_all(root, args.train_conversations, args.test, args.seed)
        t0 = time.perf_counter()
        train(run_config(text_dir, root / "base", args.pretrain_steps), progress=False)
        print(f"pretrained on Tiny Shakespeare: {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s")
        # The base model as fine-tuning starts from it: its own shape, the chat tokens' rows added.
        chat_tok = data_tokenizer(chat_dir)
        base_cfg = run_config(chat_dir, root / "unused", 1, init_from=str(root / "base"), loss="assistant")
        results["base"] = score(pretrained_model(base_cfg, chat_tok), chat_tok, test)
        for loss in ("assistant", "all"):
            t0 = time.perf_counter()
            cfg = run_config(chat_dir, root / f"sft-{loss}", args.steps, init_from=str(root / "base"), loss=loss)
            done = train(cfg, progress=False)
            model, tok = ckpt.load_model_and_tokenizer(str(done.checkpoint))
            results[loss] = {**score(model, tok, test), "seconds": time.perf_counter() - t0}
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; {args.test} held-out questions, greedy replies")
    names = {"base": "base model (no fine-tuning)", "assistant": "train.loss = assistant", "all": "train.loss = all"}
    for key, r in results.items():
        took = f", {r['seconds']:.0f} s" if "seconds" in r else ""
        print(
            f"  {names[key]:<28} exact match {r['exact']:6.1%}   user's voice {r['user_voice']:6.1%}{took}"
            f"   e.g. {r['example']!r}"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args) | {"json": str(args.json)}, **results}))


if __name__ == "__main__":
    main()
