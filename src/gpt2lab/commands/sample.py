"""Generate text from GPT-2 or a gpt2lab checkpoint, streamed to the terminal.

Examples:
  gpt2lab sample --model gpt2 --prompt "Hello, I'm a language model,"
  gpt2lab sample --model runs/shakespeare --prompt "ROMEO:" --num-samples 3 --seed 1
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import TYPE_CHECKING

from ..errors import GPT2LabError

if TYPE_CHECKING:  # these import torch: loaded where used
    import torch

    from ..generate import SamplingParams
    from ..model import GPT
    from ..tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="gpt2", help="Hub name, HF directory, or gpt2lab checkpoint/run dir (default: gpt2)"
    )
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    add_sampling_arguments(p)
    p.add_argument("--num-samples", type=int, default=1, metavar="S", help="samples, decoded as one batch")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.add_argument("--ignore-eot", action="store_true", help="keep going past <|endoftext|>")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that generates (`sample`, `chat`): length, sampling, seed, where to run."""
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default: 0.8)")
    p.add_argument(
        "--top-k", type=int, default=200, metavar="K", help="keep the K most likely tokens; 0 = off (default: 200)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 0 or 1 = off (default: 1)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="float32 | bfloat16 | float16 | int8 (int8: 8-bit weights, CPU only; default: float32)",
    )
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the checkpoint's, or GPT-2's)"
    )


def check_sampling(args: argparse.Namespace) -> None:
    """One line for each sampling flag out of range (see add_sampling_arguments)."""
    if args.max_new_tokens < 1:
        raise GPT2LabError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise GPT2LabError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise GPT2LabError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.top_p <= 1:
        raise GPT2LabError(f"--top-p must be between 0 and 1 (0 or 1 = off), got {args.top_p}")


def sampling_params(args: argparse.Namespace, seed: int, stop_token: int | None) -> SamplingParams:
    """The SamplingParams the flags ask for."""
    from ..generate import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p or 1.0,  # 0 = off, as with --top-k
        seed=seed,
        stop_token=stop_token,
    )


def _check(args: argparse.Namespace) -> None:
    check_sampling(args)
    if args.num_samples < 1:
        raise GPT2LabError(f"--num-samples must be at least 1, got {args.num_samples}")


def load_for_generation(args: argparse.Namespace) -> tuple[torch.device, GPT, Tokenizer]:
    """The device, model and tokenizer that --model, --device, --dtype and --tokenizer ask for."""
    from .. import accel
    from ..checkpoint import load_model_and_tokenizer
    from ..runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(accel.inference_dtype(args.dtype))  # int8: float32, then quantized
    model, tok = load_model_and_tokenizer(args.model, device=device, dtype=dtype, tokenizer=args.tokenizer)
    accel.apply_inference_dtype(model, args.dtype)
    return device, model, tok


def run(args: argparse.Namespace) -> int:
    _check(args)
    from ..generate import GenerationStats, generate, stream_text

    device, model, tok = load_for_generation(args)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    prompt_ids = tok.encode(args.prompt) if args.prompt else [tok.eot_token]
    sampling = sampling_params(args, seed, None if args.ignore_eot else tok.eot_token)
    out = sys.stdout
    stats = GenerationStats()
    if args.num_samples == 1 and not args.no_stream:
        out.write(args.prompt)
        out.flush()
        for piece in stream_text(model, tok, prompt_ids, args.max_new_tokens, sampling=sampling, stats=stats):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        result = generate(model, prompt_ids, args.max_new_tokens, sampling=sampling, num_samples=args.num_samples)
        stats = result.stats
        for i, tokens in enumerate(result.tokens):
            if tokens and tokens[-1] == tok.eot_token and not args.ignore_eot:
                tokens = tokens[:-1]
            if args.num_samples > 1:
                out.write(f"---------- sample {i + 1} of {args.num_samples} ----------\n")
            out.write(args.prompt + tok.decode(tokens) + "\n")
    out.flush()
    print(
        f"[{stats.new_tokens} tokens x {stats.num_samples} sample(s) in "
        f"{stats.prefill_seconds + stats.decode_seconds:.2f}s: {stats.tokens_per_second:.1f} tokens/s "
        f"on {device.type}, seed {seed}]",
        file=sys.stderr,
    )
    return 0
