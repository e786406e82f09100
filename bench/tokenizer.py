"""Custom BPE vs GPT-2's tokenizer: compression on CJK text and Python source, and throughput.

Two corpora, each split into disjoint training and evaluation parts:
  python  the standard library's own .py files (every CPython ships them), split by file;
  cjk     generated Chinese/Japanese-like text: a Zipf-distributed vocabulary of 1-4 character words
          over common CJK ideographs and kana, with CJK punctuation (deterministic; no download).
For each, a 32K-token tokenizer is trained with `gpt2lab` on the training part, and bytes per token are
measured for GPT-2 and for it on the evaluation part. Throughput is compared with the `tokenizers`
library doing the same work alone, in the same run:
  training   gpt2lab.tokenizer_train.train_bpe vs a bare `tokenizers` BpeTrainer with the same settings;
  encoding   gpt2lab (tiktoken, encode_batch) vs `tokenizers` encode_batch on the same tokenizer.

    python bench/tokenizer.py [--vocab-size 32768] [--max-mb 8]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sysconfig
import tempfile
import time
from pathlib import Path


def python_corpus(max_bytes: int) -> tuple[list[str], list[str]]:
    """Standard-library sources: files whose path hash is even train, odd evaluate."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, evaluate, sizes = [], [], [0, 0]
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        side = hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] % 2
        if sizes[side] >= max_bytes:
            continue
        (train if side == 0 else evaluate).append(text)
        sizes[side] += len(text.encode())
    return train, evaluate


def cjk_corpus(max_bytes: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    ideographs = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    kana = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
    alphabet = ideographs + kana
    words = ["".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 2, 2, 3, 4]))) for _ in range(20000)]
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(words))]  # Zipf's law
    punct = ["，", "。", "、", "！", "？", "「", "」", "\n"]

    def document() -> str:
        parts = []
        for _ in range(rng.randint(40, 200)):
            parts.extend(rng.choices(words, weights, k=rng.randint(3, 12)))
            parts.append(rng.choice(punct))
        return "".join(parts)

    out: list[list[str]] = [[], []]
    for side in (0, 1):
        size = 0
        while size < max_bytes:
            doc = document()
            out[side].append(doc)
            size += len(doc.encode())
    return out[0], out[1]


def bare_tokenizers_train(texts: list[str], vocab_size: int, pattern: str):
    """The peer: the same `tokenizers` trainer and settings, without gpt2lab's checks and conversion."""
    from gpt2lab.tokenizer_train import bpe_trainer

    hf, trainer = bpe_trainer(vocab_size - 1, pattern, progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return hf


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--max-mb", type=float, default=8.0, help="MB of text per corpus part (default: 8)")
    args = ap.parse_args()

    from tokenizers import Tokenizer as HFTokenizer

    from gpt2lab.tokenizer import get_tokenizer
    from gpt2lab.tokenizer_train import PATTERNS, save_trained, train_bpe

    gpt2 = get_tokenizer()
    max_bytes = int(args.max_mb * 1e6)
    print(f"vocab {args.vocab_size}, up to {args.max_mb} MB per part, GPT-2 split pattern\n")
    print(
        f"{'corpus':<7} {'eval MB':>7} {'GPT-2 B/tok':>11} {'custom B/tok':>12} {'tokens saved':>12} "
        f"{'train s':>8} {'bare s':>7} {'ratio':>6} {'enc MB/s':>8} {'tokenizers MB/s':>15} {'ratio':>6}"
    )
    for name, make in (("python", python_corpus), ("cjk", cjk_corpus)):
        train_texts, eval_texts = make(max_bytes)
        eval_bytes = sum(len(t.encode()) for t in eval_texts)
        t_ours, trained = timed(lambda texts=train_texts: train_bpe(texts, args.vocab_size, progress=False))
        t_bare, _ = timed(lambda texts=train_texts: bare_tokenizers_train(texts, args.vocab_size, PATTERNS["gpt2"]))
        with tempfile.TemporaryDirectory() as tmp:
            custom = save_trained(trained, Path(tmp) / "tok", name=f"{name}-{args.vocab_size}")
            hf = HFTokenizer.from_file(str(custom.path / "tokenizer.json"))
            custom.encode_batch(eval_texts[:50])  # warm-up
            hf.encode_batch(eval_texts[:50], add_special_tokens=False)
            t_enc, ids = timed(lambda c=custom, t=eval_texts: c.encode_batch(t))
            t_hf, hf_ids = timed(lambda h=hf, t=eval_texts: h.encode_batch(t, add_special_tokens=False))
            assert [e.ids for e in hf_ids] == ids, "tiktoken and tokenizers disagree"
        n_custom = sum(len(x) for x in ids)
        n_gpt2 = sum(len(x) for x in gpt2.encode_batch(eval_texts))
        mb = eval_bytes / 1e6
        print(
            f"{name:<7} {mb:>7.1f} {eval_bytes / n_gpt2:>11.2f} {eval_bytes / n_custom:>12.2f} "
            f"{1 - n_custom / n_gpt2:>11.0%} {t_ours:>8.1f} {t_bare:>7.1f} {t_bare / t_ours:>5.2f}x "
            f"{mb / t_enc:>8.1f} {mb / t_hf:>15.1f} {t_hf / t_enc:>5.2f}x"
        )
    print("\nratio > 1: gpt2lab faster than the tokenizers library alone")


if __name__ == "__main__":
    main()
