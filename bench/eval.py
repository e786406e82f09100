"""HellaSwag scoring speed: gpt2lab vs the same scoring done naively with transformers, same run.

GPT-2 124M with random weights (the same weights in both), synthetic items in the official schema
whose lengths follow HellaSwag's validation set (context 20-80 tokens, endings 8-40 tokens). The
naive peer is the reference scripts' approach written the plain way: one candidate at a time through
`GPT2LMHeadModel`, its shifted-label loss over the ending tokens. gpt2lab is timed both ways it can
run (eval/hellaswag.py): an item's context once with its four endings after it in one row (its
default on CPU), and `--batch-size` items per forward pass as full rows (its default on GPUs);
both compute logits at the ending positions only. Each is warmed up, the three are timed `--repeats`
times in turn and the medians are reported, as items per second and per CPU-second of the process;
all must make the same predictions.

    python bench/eval.py                    # CPU, float32, as docs/performance.md
    python bench/eval.py --threads 1        # one thread: what each method costs, least disturbed by other jobs
    python bench/eval.py --items 200 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

VOCABULARY = (
    "the a man woman child dog cat car house tree river road city kitchen table chair window door ball "
    "walks runs sits opens closes picks puts takes gives looks turns holds throws cuts pours washes "
    "slowly quickly carefully then and while before after into onto over under with from to of in on "
    "red small large old new green bright quiet wooden heavy water bread knife paper rope bicycle"
)
WORDS = VOCABULARY.split()


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """`n` items in the official schema, with HellaSwag-like lengths (about one token per word here)."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    items = []
    for i in range(n):
        ctx_a, ctx_b = words(16, 70).capitalize() + ".", words(2, 8)
        items.append(
            {
                "ind": i,
                "activity_label": "Synthetic",
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}",
                "endings": [words(8, 40) + "." for _ in range(4)],
                "source_id": f"synthetic~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": rng.randrange(4),
            }
        )
    return items


def build(device: torch.device, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.accel import pack_for_inference
    from gpt2lab.hf import config_from_hf, state_dict_from_hf
    from gpt2lab.model import GPT

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    cfg = config_from_hf(hf.config.to_dict())
    ours = GPT.from_state_dict(cfg, state_dict_from_hf(hf.state_dict(), cfg)).eval().to(device)
    pack_for_inference(ours, 64)  # as `gpt2lab eval` does on CPU
    return hf.to(device), ours


def naive_predictions(hf, tok, records: list[dict], device: torch.device) -> list[tuple[int, int]]:
    """(pred, pred_norm) per item, one candidate per forward pass through transformers."""
    out = []
    with torch.inference_mode():
        for record in records:
            ctx = tok.encode(record["ctx"])
            sums, means = [], []
            for ending in record["endings"]:
                end = tok.encode(" " + ending)
                ids = torch.tensor([ctx + end], device=device)
                labels = ids.clone()
                labels[:, : len(ctx)] = -100
                mean = hf(ids, labels=labels).loss.item()
                sums.append(mean * len(end))
                means.append(mean)
            out.append((min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)))
    return out


def timed(fn):
    """(wall seconds, CPU seconds of this process, fn's result)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="gpt2lab items per forward pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from gpt2lab import get_tokenizer
    from gpt2lab.eval import EvalContext, hellaswag

    device = torch.device(args.device)
    tok = get_tokenizer()
    hf, ours = build(device)
    records = synthetic_items(args.items)
    items = [hellaswag.parse_item(r, f"synthetic:{i}") for i, r in enumerate(records)]
    rows = sum(len(tok.encode(r["ctx"])) * 4 + sum(len(tok.encode(" " + e)) for e in r["endings"]) for r in records)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"GPT-2 124M (random weights), float32, {device}; {args.items} synthetic items in the official schema,")
    print(f"{rows / args.items:.0f} tokens per item over its 4 candidates")

    def gpt2lab_run(share_context: bool, subset=items):
        def run():
            ctx = EvalContext(device=device, batch_size=args.batch_size)
            scores = hellaswag.score_items(ours, tok, subset, ctx, share_context=share_context)
            return [(s.pred, s.pred_norm) for s in scores]

        return run

    contenders = {
        "gpt2lab, shared context": gpt2lab_run(True),
        f"gpt2lab, batch {args.batch_size} full rows": gpt2lab_run(False),
        "transformers, one at a time": lambda: naive_predictions(hf, tok, records, device),
    }
    gpt2lab_run(True, items[:2])()  # warm-up
    gpt2lab_run(False, items[: args.batch_size])()
    naive_predictions(hf, tok, records[:2], device)
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    predictions = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            t, c, predictions[name] = timed(fn)
            wall[name].append(t)
            cpu[name].append(c)
    # Items per CPU-second as well: on a machine shared with other work it moves much less than wall time.
    rates = {name: args.items / statistics.median(ts) for name, ts in wall.items()}
    cpu_rates = {name: args.items / statistics.median(ts) for name, ts in cpu.items()}
    naive, naive_cpu = rates["transformers, one at a time"], cpu_rates["transformers, one at a time"]
    print(f"{'':>30} {'items/s':>8} {'vs naive':>9} {'items/CPU-s':>12} {'vs naive':>9}")
    for name, rate in rates.items():
        per_cpu = cpu_rates[name]
        print(f"{name:>30} {rate:>8.2f} {rate / naive:>8.2f}x {per_cpu:>12.2f} {per_cpu / naive_cpu:>8.2f}x")
    same = len({tuple(p) for p in predictions.values()}) == 1
    print(f"same predictions: {same}")


if __name__ == "__main__":
    main()
