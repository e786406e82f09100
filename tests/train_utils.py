"""Builders shared by the training tests: tiny run configs, and the losses a run recorded. The
prepared corpus they train on is conftest's `corpus` fixture."""

from __future__ import annotations

import json
from pathlib import Path

from gpt2lab.train.config import TrainConfig


def tiny_config(data_dir: Path, out_dir: Path, shape: bool = True, **sections: dict) -> TrainConfig:
    """A 2-layer, 32-wide GPT-2 on 4 x 16-token micro-batches: a step takes milliseconds on a CPU.
    With shape=False the [model] sizes are left out (for fine-tuning, where they come from the weights)."""
    base = {
        "model": {"preset": "gpt-nano", "n_layer": 2, "n_head": 2, "n_embd": 32} if shape else {},
        "data": {"dir": str(data_dir)},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {
            "out_dir": str(out_dir),
            "batch_size": 4,
            "seq_len": 16,
            "total_batch_tokens": 128,
            "max_steps": 8,
            "precision": "fp32",
            "device": "cpu",
        },
        "eval": {"every": 0, "val_tokens": 256, "sample_tokens": 0},
        "checkpoint": {"every": 4, "keep_last": 10},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record in RUN/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
