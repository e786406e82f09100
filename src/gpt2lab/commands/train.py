"""Train GPT-2 from scratch or fine-tune it, on one device or many (torchrun).

A run is a TOML config (see configs/) plus overrides; the resolved config, metrics.jsonl and
checkpoints/ go to train.out_dir.

Examples:
  gpt2lab train configs/shakespeare-cpu.toml
  gpt2lab train configs/shakespeare-cpu.toml --set optim.lr=3e-3 --set train.max_steps=100
  gpt2lab train configs/finetune-gpt2-shakespeare.toml --init-from gpt2-medium
  gpt2lab train configs/gpt2-124M-fineweb-edu.toml --resume auto
  torchrun --standalone --nproc_per_node=8 -m gpt2lab train configs/gpt2-124M-fineweb-edu.toml
  torchrun --standalone --nproc_per_node=8 -m gpt2lab train configs/finetune-gpt2-xl.toml --parallel fsdp
  gpt2lab train configs/finetune-gpt2-xl.toml --plan --world-size 8 --gpu-memory 40
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from ..train.config import PARALLEL, key_type, load_train_config, to_toml


@dataclass(frozen=True)
class Shortcut:
    """A flag that sets one config key as `--set KEY=VALUE` does: read as the key's type (key_type, the
    annotation --set checks against) and applied with the --set overrides' checks. A true/false key's
    flag takes no value and sets it true."""

    key: str  # section.key
    help: str
    metavar: str = ""
    choices: tuple[str, ...] = ()


# The flags for the keys set most often: `--data DIR` is `--set data.dir=DIR`.
SHORTCUTS: dict[str, Shortcut] = {
    "--init-from": Shortcut("train.init_from", "start from these weights: Hub name, HF dir, or checkpoint", "MODEL"),
    "--data": Shortcut("data.dir", "prepared shards", "DIR"),
    "--out": Shortcut("train.out_dir", "run directory", "DIR"),
    "--max-steps": Shortcut("train.max_steps", "optimizer steps", "N"),
    "--max-minutes": Shortcut(
        "train.max_minutes", "end the run (evaluate, checkpoint) before M minutes of training have passed", "M"
    ),
    "--eval-every": Shortcut("eval.every", "evaluate every N steps", "N"),
    "--ckpt-every": Shortcut("checkpoint.every", "checkpoint every N steps", "N"),
    "--device": Shortcut("train.device", "auto | cpu | cuda | mps", "DEV"),
    "--compile": Shortcut("train.compile", "torch.compile the model"),
    "--parallel": Shortcut(
        "train.parallel",
        "under torchrun: replicate the model (ddp) or shard weights, gradients and optimizer (fsdp)",
        choices=PARALLEL,
    ),
    "--activation-checkpointing": Shortcut(
        "train.activation_checkpointing", "recompute each block in the backward: less activation memory"
    ),
    "--skip-nonfinite": Shortcut(
        "train.skip_nonfinite", "skip up to N steps with a NaN/inf loss instead of stopping", "N"
    ),
    "--wandb": Shortcut("train.wandb_project", "also log to this Weights & Biases project", "PROJECT"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.toml", help="the run's TOML file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable); each flag below that names a key "
        "is a shortcut for --set",
    )
    p.add_argument(
        "--resume",
        default="never",
        metavar="auto|never|PATH",
        help="auto: continue from the run's newest checkpoint, if any; PATH: from that checkpoint or run "
        "(default: never, which refuses an out_dir that already has checkpoints)",
    )
    for flag, shortcut in SHORTCUTS.items():
        kind, text = key_type(shortcut.key), f"{shortcut.help} ({shortcut.key})"
        if kind is bool:
            p.add_argument(flag, dest=shortcut.key, action="store_true", default=None, help=text)
        else:
            choices = shortcut.choices or None
            p.add_argument(
                flag, dest=shortcut.key, type=kind, choices=choices, metavar=shortcut.metavar or None, help=text
            )
    p.add_argument("--plan", action="store_true", help="print the per-device memory plan for DDP and FSDP and exit")
    p.add_argument(
        "--world-size", type=int, metavar="N", help="ranks for --plan (default: $WORLD_SIZE, else GPUs, else 1)"
    )
    p.add_argument(
        "--gpu-memory", type=float, metavar="GB", help="device memory for --plan (default: the detected GPU's)"
    )
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="checkpoint and stop after this step, as an interruption would (the schedule still runs to max_steps)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def resolve(args: argparse.Namespace):
    """The TrainConfig: the TOML file, then --set overrides, then the SHORTCUTS flags given."""
    cfg = load_train_config(args.config, args.overrides)
    keys = [shortcut.key for shortcut in SHORTCUTS.values()]
    flags = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    return cfg.with_overrides(flags, source="command line") if flags else cfg


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.print_config:
        sys.stdout.write(to_toml(cfg))
        return 0
    if args.plan:
        sys.stdout.write(memory_plan(cfg, args.world_size, args.gpu_memory))
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
    use = "chat --model {}" if cfg.train.loss == "assistant" else "sample --model {} --prompt '...'"
    print(f"next:          gpt2lab {use.format(result.run_dir)}   gpt2lab plot {result.run_dir}")
    return 0


def plan_model_config(cfg):
    """The shape a run will train: a preset or checkpoint named by train.init_from, else [model]."""
    from ..config import MODEL_PRESETS, GPTConfig

    source = cfg.train.init_from
    name = source.removeprefix("openai-community/")
    if name in MODEL_PRESETS:
        return GPTConfig.from_preset(name, dropout=cfg.model.dropout, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    if source:
        from ..checkpoint import missing_model_path, read_meta, resolve_checkpoint
        from ..errors import GPT2LabError

        missing = missing_model_path(source)
        if missing:
            raise GPT2LabError(f"train.init_from: {missing}")
        found = resolve_checkpoint(source)
        if found is not None:
            return GPTConfig.from_dict(read_meta(found)["model"])
    return cfg.model_config()


def memory_plan(cfg, world_size: int | None, gpu_memory_gb: float | None) -> str:
    """The text `--plan` prints (see gpt2lab.train.plan)."""
    import torch

    from ..errors import GPT2LabError
    from ..train.build import gradient_accumulation
    from ..train.plan import format_plan, plan

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 0)) or torch.cuda.device_count() or 1
    if world_size < 1:
        raise GPT2LabError(f"--world-size must be at least 1, got {world_size}")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise GPT2LabError(f"--gpu-memory must be positive (GB), got {gpu_memory_gb}")
    memory = gpu_memory_gb * 1e9 if gpu_memory_gb else None
    if memory is None and torch.cuda.is_available():
        memory = float(torch.cuda.get_device_properties(0).total_memory)
    model = plan_model_config(cfg)
    t = cfg.train
    accum = gradient_accumulation(cfg, world_size)
    compute = 4 if t.precision == "fp32" else 2  # auto plans for a GPU's bf16
    plans = [plan(model, p, world_size, t.batch_size, t.seq_len, accum, compute) for p in ("ddp", "fsdp")]
    head = (
        f"{model.n_layer} layers x {model.n_embd} wide, micro-batch {t.batch_size} x {t.seq_len}, "
        f"{world_size} rank(s), gradient accumulation {accum}, compute in {'float32' if compute == 4 else 'bf16'}\n"
    )
    return head + format_plan(plans, t.batch_size, memory)
