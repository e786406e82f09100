"""Training speed of GPT-2 (124M) on one GPU: gpt2lab vs transformers, and a short loss-curve check.

    python bench/train_gpu.py throughput            # T=1024, bf16, torch.compile: tokens/s and MFU
    python bench/train_gpu.py curve --out DIR       # 200 steps of `gpt2lab train` on a local corpus

throughput: the same training step (gpt2lab's fused AdamW, bf16 autocast, clipping) for gpt2lab's GPT
and for transformers' GPT2LMHeadModel with sdpa attention, both compiled, then transformers uncompiled,
in one process on the same batches. MFU counts GPT.estimate_flops_per_token (the PaLM formula) against
the GPU's dense bf16 peak (gpt2lab/metrics.py).

curve: the real command, `gpt2lab train configs/gpt2-124M-fineweb-edu.toml` with 200 steps of 64K tokens
on a corpus that needs no network (the Python documentation from `pydoc_data`, or --data DIR), and
checks that the loss is finite and falls. `--tiny` runs both parts with a toy model, e.g. on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def throughput(args: argparse.Namespace) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.config import GPTConfig, OptimSection
    from gpt2lab.metrics import mfu, peak_flops
    from gpt2lab.model import GPT
    from gpt2lab.train.optim import build_optimizer

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    T = 64 if args.tiny else 1024
    B = args.batch_size
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        buf = torch.randint(0, 50257, (B, T + 1), generator=gen)
        batches.append((buf[:, :-1].contiguous().to(device), buf[:, 1:].contiguous().to(device)))
    with torch.device("meta"):  # only the shape is needed
        flops_per_token = GPT(GPTConfig(**shape, block_size=T, pad_vocab_multiple=64)).estimate_flops_per_token()
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; GPT-2 {shape}, batch {B} x {T}, bf16 autocast")

    def build(which: str) -> tuple[torch.nn.Module, object]:
        torch.manual_seed(0)
        if which == "gpt2lab":
            model = GPT(GPTConfig(**shape, block_size=T, pad_vocab_multiple=64)).to(device)
            return model, lambda m, x, y: m(x, y, return_logits=False)[1]
        cfg = GPT2Config(**shape, n_positions=T, vocab_size=50257, attn_implementation="sdpa")
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        model = GPT2LMHeadModel(cfg).to(device)
        return model, lambda m, x, y: m(input_ids=x, labels=y, shift_labels=y).loss

    results = {}
    can_compile = device.type == "cuda"  # compiling for the CPU takes longer than the toy run itself
    rows = [("gpt2lab", can_compile), ("transformers", can_compile)]
    if can_compile:
        rows.append(("transformers", False))
    for which, compiled in rows:
        label = f"{which}{' (compiled)' if compiled else ' (eager)'}"
        model, loss_fn = build(which)
        model.train()
        opt = build_optimizer(model, OptimSection(), device)
        run = torch.compile(model) if compiled else model
        try:
            t_compile = time.perf_counter()
            times = []
            for i in range(args.warmup + args.steps):
                x, y = batches[i % len(batches)]
                t0 = time.perf_counter()
                with amp:
                    loss = loss_fn(run, x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i == args.warmup - 1:
                    print(f"{label}: warm-up (incl. compilation) {time.perf_counter() - t_compile:.0f}s", flush=True)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            dt = sorted(times)[len(times) // 2]
            tps = B * T / dt
            util = mfu(flops_per_token, tps, peak)
            results[label] = tps
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            util_text = f"{100 * util:.1f}%" if util is not None else "n/a"
            print(f"{label:26} {tps:12,.0f} tokens/s  MFU {util_text:>6}  loss {loss.item():.3f}  mem {mem:.1f} GiB")
        except Exception as e:  # report and go on: the other rows are still worth having
            print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        del model, opt, run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    ours_label = next((label for label in results if label.startswith("gpt2lab")), None)
    for label, tps in results.items():
        if ours_label and not label.startswith("gpt2lab"):
            print(f"ratio {ours_label} / {label}: {results[ours_label] / tps:.2f}x")


def curve(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        from pydoc_data.topics import topics

        from gpt2lab.data.prepare import PrepareOptions, prepare

        out.mkdir(parents=True, exist_ok=True)
        corpus = out / "pydoc-topics.jsonl"
        corpus.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
        prepare(PrepareOptions(source=str(corpus), out=data, progress=False))
    run = out / "run"
    sets = [
        f"data.dir={data}",
        f"train.out_dir={run}",
        f"train.max_steps={args.steps}",
        "optim.warmup_steps=20",
        "eval.every=100",
        "eval.val_tokens=8192",
        "checkpoint.every=100",
        "eval.tasks=[]",  # HellaSwag would need a download
    ]
    if args.tiny:
        sets += ["model.preset=gpt-nano", "train.batch_size=4", "train.seq_len=64", "train.total_batch_tokens=256"]
        sets += ["train.compile=false", "train.precision=fp32"]
    else:
        sets += ["train.batch_size=16", "train.total_batch_tokens=65536"]
    cmd = [sys.executable, "-m", "gpt2lab", "train", str(ROOT / "configs" / "gpt2-124M-fineweb-edu.toml")]
    cmd += [f"--set={s}" for s in sets] + ["--device", args.device, "--no-progress"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for r in train:
        if r["step"] % 20 == 0 or r["step"] == 1:
            mfu_text = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            print(f"step {r['step']:4d}  loss {r['loss']:.4f}  {r['tokens_per_sec']:12,.0f} tok/s  MFU {mfu_text}")
    losses = [r["loss"] for r in train]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    ok = all(math.isfinite(v) for v in losses) and last < first - 2.0
    print(f"loss {first:.3f} (first 5 steps) -> {last:.3f} (last 5): {'OK' if ok else 'NOT OK'}")
    from gpt2lab.metrics import plot_runs

    print(f"plot: {plot_runs([run], out / 'curve.png')}")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--steps", type=int, default=20)
    c = sub.add_parser("curve")
    c.add_argument("--out", default="bench-out")
    c.add_argument("--data", help="prepared shards to use instead of the pydoc corpus")
    c.add_argument("--steps", type=int, default=200)
    for p in (t, c):
        p.add_argument("--device", default="cuda")
        p.add_argument("--tiny", action="store_true", help="a toy model (for trying the script on a CPU)")
    args = ap.parse_args()
    (throughput if args.part == "throughput" else curve)(args)


if __name__ == "__main__":
    main()
