"""Training speed on CPU: gpt2lab vs transformers' GPT2LMHeadModel, same size, same loop, same process.

Both models get the `configs/shakespeare-cpu.toml` shape and the same starting weights, and go through
the same training step: gpt2lab's AdamW (fused, decay on matrices), the schedule's learning rate,
gradient accumulation to the config's total batch, clipping at 1.0, the config's autocast precision
(bf16 on CPUs with bf16 instructions), on the same batches. Only the model differs: gpt2lab's
`forward(x, y, return_logits=False)` against transformers' `forward(input_ids, labels=...).loss`
(sdpa attention). The two alternate in blocks of steps; the median step time is reported.

    python bench/train_cpu.py
    python bench/train_cpu.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-cpu.toml"))
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks per model")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--precision", default=None, help="auto | bf16 | fp32 (default: the config's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.config import load_train_config
    from gpt2lab.hf import state_dict_to_hf
    from gpt2lab.runtime import autocast_dtype
    from gpt2lab.train.build import fresh_model
    from gpt2lab.train.loop import gradient_accumulation
    from gpt2lab.train.optim import build_optimizer, lr_at, set_lr

    overrides = [f"train.precision={args.precision}"] if args.precision else []
    cfg = load_train_config(args.config, overrides)
    device = torch.device("cpu")
    amp = autocast_dtype(cfg.train.precision, device)
    accum = gradient_accumulation(cfg, 1)
    B, T = cfg.train.batch_size, cfg.train.seq_len

    torch.manual_seed(0)
    ours = fresh_model(cfg, 50257).train()
    c = ours.config
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
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(accum * args.steps):
        buf = torch.randint(0, 50257, (B, T + 1), generator=gen)
        batches.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous()))  # (B, T) each, as the loader gives

    def ours_loss(x, y):
        return ours(x, y, return_logits=False)[1]

    def hf_loss(x, y):
        return hf(input_ids=x, labels=y, shift_labels=y).loss  # shift_labels: y is already shifted

    runners = {}
    for name, model, loss_fn in (("gpt2lab", ours, ours_loss), ("transformers", hf, hf_loss)):
        runners[name] = (model, loss_fn, build_optimizer(model, cfg.optim, device), [0])

    def run_block(name: str) -> list[tuple[float, float]]:
        model, loss_fn, opt, step = runners[name]
        times = []
        for _ in range(args.steps):
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
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        return times

    wait = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={wait}, torch {torch.__version__}")
    print(
        f"model {c.n_layer} layers x {c.n_embd} wide, {ours.num_params():,} parameters; micro-batch {B} x {T}, "
        f"{accum} micro-steps, {cfg.train.total_batch_tokens:,} tokens/step; autocast {amp or 'off (float32)'}"
    )
    with torch.no_grad():  # the same weights and batch give the same loss: both do the same work
        x, y = batches[0]
        print(f"starting loss: gpt2lab {ours_loss(x, y).item():.5f}, transformers {hf_loss(x, y).item():.5f}")
    for name in runners:  # warm-up: first-call allocations and oneDNN kernel selection
        run_block(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name in runners:
            times[name] += run_block(name)
    # Wall time is what a user waits; CPU time (all threads) is steadier on a machine shared with other
    # jobs, where a process that waits for a core accrues wall time but no CPU time.
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    tokens = cfg.train.total_batch_tokens
    print(f"{'':14}{'steps/s':>9}{'tokens/s':>10}{'wall s/step':>13}{'CPU s/step':>12}")
    for name in runners:
        print(f"{name:14}{1 / wall[name]:9.3f}{tokens / wall[name]:10.0f}{wall[name]:13.3f}{cpu[name]:12.3f}")
    print(
        f"ratio gpt2lab / transformers: {wall['transformers'] / wall['gpt2lab']:.2f}x steps/s (wall), "
        f"{cpu['transformers'] / cpu['gpt2lab']:.2f}x (CPU time)"
    )


if __name__ == "__main__":
    main()
