"""Decoding speed: gpt2lab vs transformers `generate()`, same weights, same process.

GPT-2 124M with random weights, a 32-token prompt, 256 new tokens, greedy, at batch 1 and batch 8.
Each configuration is warmed up once, then timed `--repeats` times alternating the two libraries;
the median is reported. On CPU, gpt2lab lays its weights out once per batch size in the layout that
decodes fastest on this machine (gpt2lab.accel.pack_for_inference: plain, transposed or oneDNN-packed,
timed once, then kept in gpt2lab's cache); that one-time cost is timed and printed separately.

    python bench/generate.py                  # float32, as the README's numbers
    python bench/generate.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def build(dtype: torch.dtype, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2lab.hf import config_from_hf, state_dict_from_hf
    from gpt2lab.model import GPT

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    cfg = config_from_hf(hf.config.to_dict())
    ours = GPT.from_state_dict(cfg, state_dict_from_hf(hf.state_dict(), cfg)).eval()
    return hf.to(dtype), ours.to(dtype)


def time_it(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from gpt2lab.accel import pack_for_inference
    from gpt2lab.generate import SamplingParams, generate

    greedy = SamplingParams(temperature=0)

    dtype = getattr(torch, args.dtype)
    hf, ours = build(dtype)
    torch.manual_seed(1)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens))
    n = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"GPT-2 124M, {args.dtype}, prompt {args.prompt_tokens} tokens, {n} new tokens, greedy")
    print(f"{'batch':>5} {'gpt2lab tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}  same tokens")

    for batch in args.batches:

        def run_ours(batch=batch):
            return generate(ours, prompt[0].tolist(), n, sampling=greedy, num_samples=batch).tokens

        def run_hf(batch=batch):
            with torch.inference_mode():
                out = hf.generate(
                    prompt.expand(batch, -1),
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=50256,
                )
            return out[:, args.prompt_tokens :].tolist()

        t_pack = time.perf_counter()
        layout = pack_for_inference(ours, batch)
        t_pack = time.perf_counter() - t_pack
        generate(ours, prompt[0].tolist(), 8, sampling=greedy, num_samples=batch)  # warm-up
        run_hf_short = hf.generate(prompt.expand(batch, -1), do_sample=False, max_new_tokens=8, pad_token_id=50256)
        del run_hf_short
        ours_times, hf_times = [], []
        same = True
        for _ in range(args.repeats):
            t, a = time_it(run_ours)
            ours_times.append(t)
            t, b = time_it(run_hf)
            hf_times.append(t)
            same = same and a == b
        ours_tps = batch * n / statistics.median(ours_times)
        hf_tps = batch * n / statistics.median(hf_times)
        print(f"{batch:>5} {ours_tps:>14.1f} {hf_tps:>19.1f} {ours_tps / hf_tps:>5.2f}x  {same}")
        print(
            f"      ({layout} weights at batch {batch}: choosing and laying them out took {t_pack:.2f}s once, "
            "not in the rate; nothing to time where gpt2lab's cache already knew)"
        )


if __name__ == "__main__":
    main()
