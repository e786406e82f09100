"""GPT-2 (124M) training on one GPU: the two parts of bench/gpu.sh (run that script, not this file).

    python3 bench/train_gpu.py speed              # tokens/s, MFU, peak memory: gpt2lab vs transformers
    python3 bench/train_gpu.py train --out DIR    # torchrun -m gpt2lab train: evaluation, checkpoint, resume
    ... --rehearse                                # either part on the CPU with a toy model

speed: one process, the same 4 random batches of 64 x 1024 tokens for every row, bf16 autocast, the
step of gpt2lab's training loop (forward, backward, clipping at 1.0, fused AdamW), one batch per step:
  gpt2lab compiled        torch.compile; the loss through Inductor's cross-entropy (model.py)
  evaluation              validation loss at the same batch size after those steps: peak memory
  gpt2lab eager           a few steps through the chunked loss of accel/loss.py; the first step's loss and
                          gradient norm must match the compiled row's (same weights, same batch)
  transformers compiled   GPT2LMHeadModel with sdpa attention, the same step
  gpt2lab deterministic   the compiled row under train.deterministic (runtime.deterministic)
Each row is timed over --steps steps back to back after its warm-up, with one synchronize at the end;
peak memory is that of those steps. MFU counts GPT.estimate_flops_per_token (the PaLM formula, with
each model's own vocabulary size) against the GPU's dense bf16 peak (metrics.GPU_PEAKS_TFLOPS).
"repeat" runs 3 steps from the initial weights twice and compares every weight bit for bit: the
deterministic row must repeat, the default one need not. All rows run with
CUBLAS_WORKSPACE_CONFIG=:4096:8, which train.deterministic sets for the whole process.

train: `torchrun --standalone --nproc_per_node=1 -m gpt2lab train configs/gpt2-124M-fineweb-edu.toml`
on Tiny Shakespeare (bundled, no network), 2 micro-steps of 64 x 1024 per step, evaluation (val loss and
a sample) every 10 steps, stopped with a checkpoint at step 20, then continued with `--resume auto` to
step 40 (the CPU rehearsal: every 4, at 8, to 16): NCCL, DDP over torch.compile, gradient accumulation,
the object collectives of checkpointing and resuming. Checks the metrics log (every step once, the
evaluations, the resume event), the final checkpoint, a falling loss, and that nothing was recompiled
(TORCH_LOGS=recompiles). The corpus is small and the model memorises it: the loss checks the plumbing,
not the recipe.

Exit status 1 when a row fails or a check does not hold; every row runs regardless.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt2-124M-fineweb-edu.toml"
GiB = 2**30


class Bench:
    """The device, the toy or full shapes, and the failures seen so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.rehearse = args.rehearse
        self.device = torch.device("cpu" if args.rehearse else "cuda")
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"FAILED: {what}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / GiB if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def free(self) -> None:
        import torch._dynamo

        torch._dynamo.reset()  # compiled graphs hold on to the last row's modules
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


# ------------------------------------------------------------------------------------------ speed


def speed(args: argparse.Namespace) -> int:
    from gpt2lab.runtime import deterministic_cublas

    deterministic_cublas()  # before CUDA starts, as the training loop does with train.deterministic
    bench = Bench(args)
    torch = bench.torch
    import numpy as np

    from gpt2lab.accel import use_fused_loss
    from gpt2lab.config import GPTConfig
    from gpt2lab.eval.common import EvalContext
    from gpt2lab.eval.val_loss import val_loss
    from gpt2lab.metrics import mfu, peak_flops
    from gpt2lab.model import GPT
    from gpt2lab.runtime import autocast, deterministic
    from gpt2lab.train.config import OptimSection
    from gpt2lab.train.optim import build_optimizer

    device = bench.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the training loop
    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.rehearse else dict(n_layer=12, n_head=12, n_embd=768)
    B, T = args.batch_size, args.seq_len
    # The rehearsal checks the script, not the numbers: a CPU without bf16 instructions emulates bf16
    # slowly, Inductor on a CPU compiles for minutes, and a toy vocabulary keeps the steps short.
    backend = "aot_eager" if args.rehearse else "inductor"
    amp = None if args.rehearse else torch.bfloat16
    vocab = 512 if args.rehearse else 50257
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        buf = torch.randint(0, vocab, (B, T + 1), generator=gen)
        batches.append((buf[:, :-1].to(device), buf[:, 1:].to(device)))  # (B, T) inputs and targets
    peak = peak_flops(device, amp)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (rehearsal, toy model)"
    precision = "bf16 autocast" if amp else "float32"
    print(f"{name}; torch {torch.__version__}; batch {B} x {T}, {precision}, compile backend {backend}")
    print(f"GPT-2 {shape}; MFU against {peak / 1e12:.1f} TFLOP/s" if peak else "MFU: no peak known for this device")

    def gpt_config(pad: int) -> GPTConfig:
        return GPTConfig(**shape, block_size=T, vocab_size=vocab, pad_vocab_multiple=pad)

    def flops(pad: int) -> float:
        with torch.device("meta"):  # only the shape is needed
            return GPT(gpt_config(pad)).estimate_flops_per_token(T)

    def build_gpt2lab() -> torch.nn.Module:
        torch.manual_seed(0)  # every gpt2lab row starts from the same weights
        return use_fused_loss(GPT(gpt_config(64)).to(device).train())  # as the trainer runs it

    def build_transformers() -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        eot = vocab - 1  # GPT-2's <|endoftext|> is its last token; a toy vocabulary keeps it inside
        cfg = GPT2Config(
            **shape, n_positions=T, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, attn_implementation="sdpa"
        )
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0  # gpt2lab's recipe has no dropout either
        model = GPT2LMHeadModel(cfg).to(device).train()
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"transformers chose {model.config._attn_implementation!r} attention, not sdpa")
        return model

    def gpt2lab_loss(m, x, y):
        return m(x, y)[1]

    def transformers_loss(m, x, y):
        logits = m(input_ids=x).logits  # (B, T, V); y are already the next tokens
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    results: dict[str, dict] = {}

    def row(
        label: str,
        build: Callable[[], torch.nn.Module],
        loss_fn: Callable,
        flops_per_token: float,
        compiled: bool,
        steps: int,
        warmup: int,
        det: bool = False,
        repeat: bool = True,
        after: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        context = (lambda: deterministic(device)) if det else None
        try:
            model = build()
            run = torch.compile(model, backend=backend) if compiled else model
            opt = build_optimizer(model, OptimSection(), device)

            def step(i: int):
                x, y = batches[i % len(batches)]
                with autocast(device, amp):
                    loss = loss_fn(run, x, y)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach(), norm.detach()

            def steps_from(start: int, n: int) -> list:
                if context is None:
                    return [step(start + i) for i in range(n)]
                out = []
                for i in range(n):
                    with context():  # per step, as the training loop
                        out.append(step(start + i))
                return out

            init = {k: v.detach().clone() for k, v in model.state_dict().items()} if repeat else None
            t0 = time.perf_counter()
            first = steps_from(0, warmup)
            bench.sync()
            warm_s = time.perf_counter() - t0
            bench.reset_peak()
            t0 = time.perf_counter()
            timed = steps_from(warmup, steps)
            bench.sync()
            dt = (time.perf_counter() - t0) / steps
            mem = bench.peak_gib()
            loss0, norm0 = (v.item() for v in first[0])
            last = timed[-1][0].item()
            tps = B * T / dt
            util = mfu(flops_per_token, tps, peak)
            info = {"tokens_per_sec": tps, "mfu": util, "peak_gib": mem, "loss1": loss0, "norm1": norm0}
            if not all(math.isfinite(v) for v in (loss0, norm0, last)):
                bench.fail(f"{label}: non-finite loss or gradient norm")
            if repeat:
                finals = []
                for _ in range(2):
                    model.load_state_dict(init)  # in place: the compiled graph stays valid
                    opt = build_optimizer(model, OptimSection(), device)
                    steps_from(0, 3)
                    finals.append([p.detach().clone() for p in model.parameters()])
                diff = max((a - b).abs().max().item() for a, b in zip(*finals))
                info["repeats"] = diff == 0.0
                repeat_text = "identical" if diff == 0.0 else f"differ (max |diff| {diff:.2e})"
            else:
                repeat_text = "-"
            util_text = "n/a" if util is None else f"{100 * util:.1f}%"
            print(
                f"{label:24} {tps:>11,.0f} tok/s  MFU {util_text:>6}  peak {gib(mem):>9}  "
                f"step-1 loss {loss0:.4f} norm {norm0:.3f}  warm-up {warm_s:.0f} s  repeat: {repeat_text}",
                flush=True,
            )
            results[label] = info
            if after is not None:
                after(model)
        except Exception as e:  # report and go on: the other rows are still worth having
            traceback.print_exc()
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            bench.fail(f"{label}: {type(e).__name__}: {text}")
        finally:
            model = run = opt = None
            bench.free()

    def evaluation_memory(model: torch.nn.Module) -> None:
        """Validation loss at the training batch size, after the compiled steps have used the allocator."""
        tokens = np.random.default_rng(0).integers(0, vocab, size=2 * B * T + 1, dtype=np.uint16)
        model.zero_grad(set_to_none=True)
        bench.sync()
        base = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
        bench.reset_peak()
        t0 = time.perf_counter()
        ctx = EvalContext(batch_size=B, autocast_dtype=amp)
        result = val_loss(model, tokens, ctx, max_tokens=2 * B * T, seq_len=T)
        bench.sync()
        seconds = time.perf_counter() - t0
        mem = bench.peak_gib()
        logits = B * T * model.config.padded_vocab_size * 2 / GiB  # one batch of bf16 logits
        above = "" if mem is None else f", {mem - base:.1f} GiB above the weights and optimizer state"
        print(
            f"{'evaluation':24} val loss {result.loss:.4f} over {result.tokens:,} tokens in {seconds:.1f} s; "
            f"peak {gib(mem)}{above} (full bf16 logits of one batch: {logits:.1f} GiB)",
            flush=True,
        )
        results["evaluation"] = {"peak_gib": mem, "base_gib": base, "loss": result.loss}
        if not math.isfinite(result.loss):
            bench.fail("evaluation: non-finite val loss")

    ours, peer = flops(64), flops(1)
    row("gpt2lab compiled", build_gpt2lab, gpt2lab_loss, ours, True, args.steps, args.warmup, after=evaluation_memory)
    row("gpt2lab eager", build_gpt2lab, gpt2lab_loss, ours, False, args.eager_steps, 1, repeat=False)
    row("transformers compiled", build_transformers, transformers_loss, peer, True, args.steps, args.warmup)
    row("gpt2lab deterministic", build_gpt2lab, gpt2lab_loss, ours, True, args.steps, args.warmup, det=True)

    print("-" * 40)
    a, e = results.get("gpt2lab compiled"), results.get("gpt2lab eager")
    if a and e:
        dl, dn = abs(a["loss1"] - e["loss1"]), abs(a["norm1"] - e["norm1"]) / max(a["norm1"], 1e-12)
        ok = dl < 0.02 and dn < 0.05
        print(f"chunked loss (eager) vs compiled, step 1: |loss diff| {dl:.4f}, grad norm {100 * dn:.2f}% apart")
        if not ok:
            bench.fail("the eager (chunked) loss disagrees with the compiled one beyond bf16 rounding")
    h = results.get("transformers compiled")
    if a and h:
        print(f"ratio gpt2lab / transformers (compiled, tokens/s): {a['tokens_per_sec'] / h['tokens_per_sec']:.2f}x")
    d = results.get("gpt2lab deterministic")
    if a and d:
        ratio = d["tokens_per_sec"] / a["tokens_per_sec"]
        mem = "" if d["peak_gib"] is None else f", peak memory {d['peak_gib'] - a['peak_gib']:+.1f} GiB"
        print(f"train.deterministic: {ratio:.2f}x the tokens/s of gpt2lab compiled{mem}")
        if not d.get("repeats"):
            bench.fail("train.deterministic: two runs from the same weights did not repeat bit for bit")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "batch": [B, T], "rows": results}, indent=1) + "\n")
    return 1 if bench.failures else 0


# ------------------------------------------------------------------------------------------ train


def train(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, run = out / "data", out / "run"
    failures: list[str] = []

    def fail(what: str) -> None:
        failures.append(what)
        print(f"FAILED: {what}", flush=True)

    if not (data / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "gpt2lab", "prepare", "tinyshakespeare", "--out", str(data)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout + done.stderr, end="")
            fail("gpt2lab prepare tinyshakespeare failed")
            return 1
    shutil.rmtree(run, ignore_errors=True)  # a rerun starts afresh
    steps, stop = (16, 8) if args.rehearse else (40, 20)  # a rehearsal only needs each event once
    sets = [
        f"data.dir={data}",
        f"train.out_dir={run}",
        f"train.max_steps={steps}",
        f"optim.warmup_steps={steps // 4}",
        f"eval.every={stop // 2}",  # evaluations between compiled steps: a recompile after one would show
        "eval.sample_tokens=32",
        "eval.tasks=[]",  # HellaSwag would need a download
        f"checkpoint.every={stop}",
    ]
    if args.rehearse:
        sets += ["model.preset=gpt-nano", "train.batch_size=4", "train.seq_len=64", "train.total_batch_tokens=512"]
        sets += ["train.compile_backend=aot_eager", "train.precision=fp32", "optim.lr=3e-3", "eval.val_tokens=2048"]
    else:  # the config's 64 x 1024 per micro-step, two micro-steps per step
        sets += ["train.total_batch_tokens=131072", "eval.val_tokens=65536"]
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    base += ["-m", "gpt2lab", "train", str(CONFIG), *(f"--set={s}" for s in sets)]
    base += ["--device", "cpu" if args.rehearse else "cuda", "--resume", "auto", "--no-progress"]
    env = {**os.environ, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    recompiles = 0
    for cmd in ([*base, "--stop-at", str(stop)], base):
        print("torchrun " + " ".join(cmd[3:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            recompiles += "Recompiling function" in line
        code = proc.wait()
        print(f"(exit {code} after {time.perf_counter() - t0:.0f} s)", flush=True)
        if code != 0:
            fail(f"gpt2lab train exited with {code}")
            return 1

    from gpt2lab.metrics import read_metrics
    from gpt2lab.train.checkpoint import find_latest_training

    records = read_metrics(run)
    kind = {k: [r for r in records if r["kind"] == k] for k in ("train", "eval", "sample", "event")}
    train_steps = [r["step"] for r in kind["train"]]
    if train_steps != list(range(1, steps + 1)):
        fail(f"metrics.jsonl: train steps {train_steps[:3]}...{train_steps[-3:]}, expected 1 to {steps} once each")
    evals = [(r["step"], r.get("val_loss")) for r in kind["eval"]]
    every = stop // 2
    expected = list(range(every, steps + 1, every))
    if [s for s, _ in evals] != expected or not all(v and math.isfinite(v) for _, v in evals):
        fail(f"metrics.jsonl: evaluations {evals}, expected a finite val loss at steps {expected}")
    if [r["step"] for r in kind["sample"]] != expected:
        fail("metrics.jsonl: a sample is missing")
    if not any(r["step"] == stop and r["message"].startswith(f"resuming from step {stop} of") for r in kind["event"]):
        fail(f"metrics.jsonl: no 'resuming from step N' event at step {stop}")
    latest = find_latest_training(run)
    if latest is None or not latest.name.endswith(f"{steps:08d}"):
        fail(f"the newest training checkpoint is {latest}, expected step {steps}")
    losses = [r["loss"] for r in kind["train"]]
    if len(losses) >= 10:
        first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
        print(f"loss {first:.3f} (steps 1-5) -> {last:.3f} (steps {steps - 4}-{steps})")
        if not (all(map(math.isfinite, losses)) and last < first - 1.0):
            fail("the training loss did not fall by 1.0")
    # Steady state: without each process's first two steps (compilation)
    steady = [r for r in kind["train"] if r["step"] not in (1, 2, stop + 1, stop + 2)]
    if steady:
        tps = statistics.median(r["tokens_per_sec"] for r in steady)
        mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
        util = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
        print(f"torchrun, 1 process, DDP + compile: {tps:,.0f} tok/s (median step), MFU {util}")
    print(f"recompilations: {recompiles}")
    if recompiles:
        fail(f"torch.compile recompiled {recompiles} time(s) (TORCH_LOGS=recompiles lines above)")
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed", help="tokens/s, MFU and peak memory of gpt2lab and transformers")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--seq-len", type=int)
    s.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation happens in the first)")
    s.add_argument("--steps", type=int, default=20, help="timed steps per row")
    s.add_argument("--eager-steps", type=int, default=3)
    s.add_argument("--json", help="also write the numbers to this file")
    t = sub.add_parser("train", help="torchrun -m gpt2lab train with evaluation, checkpoint and --resume auto")
    t.add_argument("--out", default="bench-out/gpu", help="the data and the run go to OUT/data and OUT/run")
    for p in (s, t):
        p.add_argument("--rehearse", action="store_true", help="on the CPU with a toy model")
    args = ap.parse_args()
    if args.part == "speed":
        args.batch_size = args.batch_size or (8 if args.rehearse else 64)
        args.seq_len = args.seq_len or (64 if args.rehearse else 1024)
        if args.rehearse:
            args.steps = min(args.steps, 4)
    sys.exit(speed(args) if args.part == "speed" else train(args))


if __name__ == "__main__":
    main()
