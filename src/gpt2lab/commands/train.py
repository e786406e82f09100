"""Train GPT-2 from scratch or fine-tune it, on one device or many (torchrun).

A run is a TOML config (see configs/) plus overrides; the resolved config, metrics.jsonl and
checkpoints/ go to train.out_dir.

Examples:
  gpt2lab train configs/shakespeare-cpu.toml
  gpt2lab train configs/shakespeare-cpu.toml --set optim.lr=3e-4 --set train.max_steps=100
  gpt2lab train configs/finetune-gpt2-shakespeare.toml --init-from gpt2-medium
  gpt2lab train configs/gpt2-124M-fineweb-edu.toml --resume auto
  torchrun --standalone --nproc_per_node=8 -m gpt2lab train configs/gpt2-124M-fineweb-edu.toml
"""

from __future__ import annotations

import argparse
import os
import sys

from ..train.config import load_train_config, to_toml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.toml", help="the run's TOML file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default="never",
        metavar="auto|never|PATH",
        help="auto: continue from the run's newest checkpoint, if any; PATH: from that checkpoint or run "
        "(default: never, which refuses an out_dir that already has checkpoints)",
    )
    p.add_argument("--init-from", metavar="MODEL", help="start from these weights: Hub name, HF dir, or checkpoint")
    p.add_argument("--data", metavar="DIR", help="prepared shards (data.dir)")
    p.add_argument("--out", metavar="DIR", help="run directory (train.out_dir)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (train.max_steps)")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (eval.every)")
    p.add_argument("--ckpt-every", type=int, metavar="N", help="checkpoint every N steps (checkpoint.every)")
    p.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | mps (train.device)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (train.compile)")
    p.add_argument(
        "--skip-nonfinite", type=int, metavar="N", help="skip up to N steps with a NaN/inf loss instead of stopping"
    )
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="checkpoint and stop after this step, as an interruption would (the schedule still runs to max_steps)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


FLAG_KEYS = {
    "init_from": "train.init_from",
    "data": "data.dir",
    "out": "train.out_dir",
    "max_steps": "train.max_steps",
    "eval_every": "eval.every",
    "ckpt_every": "checkpoint.every",
    "device": "train.device",
    "compile": "train.compile",
    "skip_nonfinite": "train.skip_nonfinite",
}


def resolve(args: argparse.Namespace):
    """The TrainConfig: the TOML file, then --set overrides, then the explicit flags."""
    cfg = load_train_config(args.config, args.overrides)
    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    return cfg.with_overrides(flags, source="command line") if flags else cfg


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        return 0
    from .. import distributed
    from ..train.loop import train

    try:
        result = train(cfg, resume=args.resume, stop_at=args.stop_at, progress=not args.no_progress)
    finally:
        distributed.teardown()
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    minutes = result.seconds / 60
    losses = f"train loss {result.loss:.4f}" if result.loss is not None else "no finite train loss"
    if result.val_loss is not None:
        losses += f", val loss {result.val_loss:.4f}"
    state = "stopped" if result.interrupted else "finished"
    print(f"{state} at step {result.step} ({result.tokens:,} tokens) after {minutes:.1f} min: {losses}")
    print(f"run directory: {result.run_dir} (config.toml, metrics.jsonl, checkpoints/)")
    if result.checkpoint is not None:
        print(f"checkpoint:    {result.checkpoint}")
    if result.interrupted:
        print("continue:      run the same command again with --resume auto")
    print(f"next:          gpt2lab sample --model {result.run_dir} --prompt '...'   gpt2lab plot {result.run_dir}")
    return 0
