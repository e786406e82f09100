"""Convert GPT-2 weights between Hugging Face and gpt2lab checkpoints (safetensors both ways).

Examples:
  gpt2lab convert --from-hf gpt2 --out checkpoints/gpt2
  gpt2lab convert --from-hf ./my-hf-gpt2 --out checkpoints/mine
  gpt2lab convert --to-hf runs/shakespeare --out hf-export/
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="NAME_OR_DIR", help="Hub name or Hugging Face directory to import")
    g.add_argument("--to-hf", metavar="CKPT", help="gpt2lab checkpoint or run directory to export")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the checkpoint's, or GPT-2's)"
    )


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model_and_tokenizer, save_model
    from ..hf import export_hf

    if args.from_hf:
        model, tok = load_model_and_tokenizer(args.from_hf, tokenizer=args.tokenizer)
        save_model(model, args.out, tok, overwrite=args.overwrite)
        print(f"wrote gpt2lab checkpoint {args.out} ({model.num_params():,} parameters) from {args.from_hf}")
    else:
        model, tok = load_model_and_tokenizer(args.to_hf, tokenizer=args.tokenizer)
        export_hf(model, args.out, tok, overwrite=args.overwrite)
        print(f"wrote Hugging Face GPT-2 directory {args.out} ({model.num_params():,} parameters)")
    return 0
