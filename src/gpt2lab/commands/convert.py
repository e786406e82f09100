"""Convert GPT-2 weights between Hugging Face and gpt2lab checkpoints (safetensors both ways), or export GGUF.

Examples:
  gpt2lab convert --from-hf gpt2 --out checkpoints/gpt2
  gpt2lab convert --from-hf ./my-hf-gpt2 --out checkpoints/mine
  gpt2lab convert --to-hf runs/shakespeare --out hf-export/
  gpt2lab convert --to-gguf runs/shakespeare --out shakespeare.gguf --type q8_0
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="NAME_OR_DIR", help="Hub name or Hugging Face directory to import")
    g.add_argument("--to-hf", metavar="CKPT", help="gpt2lab checkpoint or run directory to export")
    g.add_argument("--to-gguf", metavar="MODEL", help="model to export as one GGUF file for llama.cpp")
    p.add_argument(
        "--out", required=True, metavar="PATH", help="directory to write (must be new or empty), or the .gguf file"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory or an existing file")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the checkpoint's, or GPT-2's)"
    )
    p.add_argument("--type", default=None, metavar="TYPE", help="GGUF weight type: f32 (default), f16, bf16 or q8_0")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_model_and_tokenizer, save_model
    from ..errors import GPT2LabError

    if args.type is not None and not args.to_gguf:
        raise GPT2LabError("--type applies to --to-gguf only")
    if args.from_hf:
        model, tok = load_model_and_tokenizer(args.from_hf, tokenizer=args.tokenizer)
        save_model(model, args.out, tok, overwrite=args.overwrite)
        print(f"wrote gpt2lab checkpoint {args.out} ({model.num_params():,} parameters) from {args.from_hf}")
    elif args.to_hf:
        from ..hf import export_hf

        model, tok = load_model_and_tokenizer(args.to_hf, tokenizer=args.tokenizer)
        export_hf(model, args.out, tok, overwrite=args.overwrite)
        print(f"wrote Hugging Face GPT-2 directory {args.out} ({model.num_params():,} parameters)")
    else:
        from ..gguf import TYPES, check_destination, export_gguf

        weight_type = args.type or "f32"
        if weight_type not in TYPES:
            raise GPT2LabError(f"unknown --type {weight_type!r}; choose one of {', '.join(TYPES)}")
        check_destination(args.out, args.overwrite)  # before loading a model that may be large
        model, tok = load_model_and_tokenizer(args.to_gguf, tokenizer=args.tokenizer)
        name = Path(args.to_gguf.rstrip("/\\")).name or "gpt2lab"
        export_gguf(model, args.out, tok, weight_type, name=name, overwrite=args.overwrite)
        print(f"wrote GGUF file {args.out} ({weight_type}, {model.num_params():,} parameters) for llama.cpp")
    return 0
