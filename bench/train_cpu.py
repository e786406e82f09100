"""Training speed on CPU: gpt2lab against two peers, same size, same batches, same process.

- `plain`: GPT-2 as nanoGPT writes it, here in a few lines (PlainGPT below): full (B, T, 50304) logits,
  `F.cross_entropy`, `torch.optim.AdamW` with its default (foreach) implementation, nothing fused.
- `transformers`: GPT2LMHeadModel (sdpa attention), `forward(input_ids, labels=...).loss`, stepped by
  gpt2lab's optimizer.

All three get the `configs/shakespeare-cpu.toml` shape and the same starting weights and run the same
loop: the schedule's learning rate, gradient accumulation to the config's total batch, clipping at 1.0,
float32 unless --precision says otherwise. They alternate in blocks of steps; the median step time is
reported, with the ratio of gpt2lab's tokens/s to each peer's. Where the C library is glibc, each model
also runs both with malloc's defaults and with freed memory kept for reuse (what gpt2lab's trainer sets
on CPU, `gpt2lab.runtime.keep_freed_memory`): by default every tensor over 32 MB, such as the plain
model's (1024 x 50304) logits, is a fresh mmap faulted in page by page, which can cost the plain model
much of its step. The ratios are printed like for like under each setting, and as each runs out of
the box (gpt2lab's memory kept, the peers' malloc as PyTorch leaves it). The machine's own float32
GEMM rate (a 2048^3 matmul, best of several) is measured in the same run, and each model's training
FLOP/s (6 x parameters + attention, per token) is printed as a fraction of it.

    python bench/train_cpu.py
    python bench/train_cpu.py --threads 1 --rounds 5

Run it on a quiet machine: other processes on the same cores change every number.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from machine import cpu_features, cpu_name  # bench/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """The best float32 (n x n) @ (n x n) rate of this machine, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class PlainBlock(nn.Module):
    """One pre-LayerNorm GPT-2 block, written the way nanoGPT's model.py does."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """nanoGPT's GPT: tied embedding, logits over the padded 50304-token vocabulary, F.cross_entropy."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(PlainBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, 50304)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def load_from(self, ours: nn.Module) -> None:
        """Copy gpt2lab's weights (same layout: gpt2lab's Linear is nn.Linear's)."""
        sd = ours.state_dict()
        mine = self.state_dict()
        rename = {"mlp.c_proj": "mlp_proj", "attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc"}
        with torch.no_grad():
            for k, v in sd.items():
                if k.endswith(".attn.bias") or k == "lm_head.weight":
                    continue
                name = k.removeprefix("transformer.")
                for a, b in rename.items():
                    name = name.replace(a, b)
                mine[name].copy_(v)

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """nanoGPT's configure_optimizers on a CPU: decay on matrices, torch's default implementation."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-cpu.toml"))
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks per model")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--precision", default="fp32", help="auto | bf16 | fp32 (default: fp32)")
    ap.add_argument("--profile", action="store_true", help="then where gpt2lab's step spends its time (torch.profiler)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.accel import choose_cpu_loss_kernel, use_fused_loss
    from gpt2lab.hf import state_dict_to_hf
    from gpt2lab.runtime import autocast_dtype, keep_freed_memory
    from gpt2lab.train import gradient_accumulation
    from gpt2lab.train.build import fresh_model
    from gpt2lab.train.config import load_train_config
    from gpt2lab.train.optim import build_optimizer, lr_at, set_lr

    overrides = [f"train.precision={args.precision}"]
    cfg = load_train_config(args.config, overrides)
    device = torch.device("cpu")
    amp = autocast_dtype(cfg.train.precision, device)
    accum = gradient_accumulation(cfg, 1)
    B, T = cfg.train.batch_size, cfg.train.seq_len

    torch.manual_seed(0)
    ours = fresh_model(cfg, 50257).train()
    c = ours.config
    kernel_note = "float32 CPU loss: autocast, the max-shifted path"
    kernel = None
    if amp is None:  # the kernel the trainer would choose on this machine (gpt2lab/accel/tuning.py)
        kernel, how = choose_cpu_loss_kernel(c.n_embd, c.vocab_size, c.padded_vocab_size, B * T)
        kernel_note = f"float32 CPU loss: {kernel}; {how}"
    use_fused_loss(ours, kernel)  # as the trainer runs it
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            n_positions=c.block_size,
            vocab_size=c.vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
        )
    ).train()
    hf.load_state_dict(state_dict_to_hf(ours), strict=False)  # the same starting weights (HF has no padding)
    plain = PlainGPT(c.n_layer, c.n_head, c.n_embd, c.block_size, c.padded_vocab_size).train()
    plain.load_from(ours)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(accum * args.steps):
        buf = torch.randint(0, 50257, (B, T + 1), generator=gen)
        batches.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous()))  # (B, T) each, as the loader gives

    def ours_loss(x, y):
        return ours(x, y)[1]

    def hf_loss(x, y):
        return hf(input_ids=x, labels=y, shift_labels=y).loss  # shift_labels: y is already shifted

    runners = {}
    for name, model, loss_fn in (("gpt2lab", ours, ours_loss), ("plain", plain, plain), ("transformers", hf, hf_loss)):
        opt = plain.optimizer(cfg.optim.lr, cfg.optim.weight_decay) if model is plain else None
        runners[name] = (model, loss_fn, opt or build_optimizer(model, cfg.optim, device), [0])

    def run_block(name: str, memory: str = "kept") -> list[tuple[float, float]]:
        keep_freed_memory(memory == "kept")  # glibc's malloc as gpt2lab's trainer sets it, or its default
        model, loss_fn, opt, step = runners[name]
        times = []
        # With memory kept, the block's first step maps what the steps after it reuse (the switch back to
        # the default gave it to the OS): it is not timed, as a trainer's steps after its first are.
        for i in range(args.steps + (memory == "kept")):
            t0, c0 = time.perf_counter(), time.process_time()
            set_lr(opt, lr_at(step[0], cfg.optim, cfg.train.max_steps))
            for micro in range(accum):
                x, y = batches[(step[0] * accum + micro) % len(batches)]
                ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
                with ctx:
                    loss = loss_fn(x, y) / accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
            if memory != "kept" or i > 0:
                times.append((time.perf_counter() - t0, time.process_time() - c0))
        return times

    wait = ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    print(f"{cpu_name()} ({cpu_features()}), {torch.get_num_threads()} threads, {wait}")
    print(f"torch {torch.__version__}")
    print(kernel_note)
    print(
        f"model {c.n_layer} layers x {c.n_embd} wide, {ours.num_params():,} parameters; micro-batch {B} x {T}, "
        f"{accum} micro-steps, {cfg.train.total_batch_tokens:,} tokens/step; autocast {amp or 'off (float32)'}"
    )
    with torch.no_grad():  # the same weights and batch give the same loss: both do the same work
        x, y = batches[0]
        losses = {"gpt2lab": ours_loss(x, y), "plain": plain(x, y), "transformers": hf_loss(x, y)}
        print("starting loss: " + ", ".join(f"{k} {v.item():.5f}" for k, v in losses.items()))
    # Each model under both settings of glibc's malloc where there is one (gpt2lab.runtime.keep_freed_memory):
    # as PyTorch leaves it, every large tensor a fresh mmap faulted in page by page, and with freed memory
    # kept for reuse, as gpt2lab's trainer sets it on CPU.
    memories = ("default", "kept") if keep_freed_memory() else ("default",)
    rows = [(name, memory) for name in runners for memory in memories]
    for row in rows:  # warm-up: first-call allocations and oneDNN kernel selection
        run_block(*row)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            times[row] += run_block(*row)
    keep_freed_memory(False)
    # Wall time is what a user waits; CPU time (all threads) is steadier on a machine shared with other
    # jobs, where a process that waits for a core accrues wall time but no CPU time.
    wall = {row: statistics.median(w for w, _ in t) for row, t in times.items()}
    cpu = {row: statistics.median(c for _, c in t) for row, t in times.items()}
    tokens = cfg.train.total_batch_tokens
    peak = gemm_gflops()
    flops = ours.estimate_flops_per_token(T)  # the same model for all three: the same useful work
    print(f"float32 GEMM (2048^3) on this machine: {peak:.0f} GFLOP/s; training: {flops / 1e6:.1f} MFLOP/token")
    print(
        f"{'':14}{'malloc':>10}{'steps/s':>9}{'tokens/s':>10}{'wall s/step':>13}{'CPU s/step':>12}{'of GEMM':>9}"
    )
    for name, memory in rows:
        w = wall[name, memory]
        print(
            f"{name:14}{memory:>10}{1 / w:9.3f}{tokens / w:10.0f}{w:13.3f}{cpu[name, memory]:12.3f}"
            f"{tokens / w * flops / 1e9 / peak:9.0%}"
        )
    # Like for like under each malloc setting; then as each runs out of the box, where glibc's malloc
    # is there to set: gpt2lab's trainer keeps freed memory, the peers' loops leave malloc as it is.
    pairs = [(f"malloc {m}", ("gpt2lab", m), m) for m in memories]
    if "kept" in memories:
        pairs.append(("out of the box (gpt2lab kept, peer default)", ("gpt2lab", "kept"), "default"))
    for label, ours_row, peer_memory in pairs:
        for peer in ("plain", "transformers"):
            theirs = (peer, peer_memory)
            print(
                f"ratio gpt2lab / {peer}, {label}: {wall[theirs] / wall[ours_row]:.2f}x tokens/s (wall), "
                f"{cpu[theirs] / cpu[ours_row]:.2f}x (CPU time)"
            )
    if args.profile:
        profile_step(run_block, "gpt2lab")  # with freed memory kept where it can be


PHASES = (
    # (phase, ops whose self time counts for it), by the op names torch.profiler reports
    ("matmuls (the output layer's, and the blocks')", ("aten::mm", "aten::addmm_", "aten::addmm")),
    ("elementwise: exp, sums, copies, fills", ("aten::exp_", "aten::sum", "aten::copy_", "aten::fill_")),
    ("attention (forward and backward)", ("aten::_scaled_dot_product_flash_attention_for_cpu",)),
    ("optimizer (fused AdamW)", ("aten::_fused_adamw_",)),
)


def profile_step(run_block, name: str) -> None:
    """torch.profiler over a block of gpt2lab's steps: the ops with the most self time, and a rough split
    by kind of work."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_block(name)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of {name}'s steps (self CPU time, all threads):")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]:
        print(f"  {e.key[:48]:48} {e.self_cpu_time_total / total:6.1%}  {e.count:5d} calls")
    for phase, ops in PHASES:
        part = sum(e.self_cpu_time_total for e in events if any(e.key.startswith(o) for o in ops))
        print(f"  {phase:48} {part / total:6.1%}")


if __name__ == "__main__":
    main()
