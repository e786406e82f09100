"""Builders shared by the training tests: a small prepared corpus and tiny run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shakespeare_text

from gpt2lab.config import TrainConfig

_PREPARED: dict[str, Path] = {}


def tiny_corpus(root: Path, chars: int = 60_000, val_tokens: int = 2048) -> Path:
    """The first `chars` characters of Tiny Shakespeare, prepared into shards (once per session)."""
    key = f"{chars}-{val_tokens}"
    if key in _PREPARED and _PREPARED[key].is_dir():
        return _PREPARED[key]
    from gpt2lab.data.prepare import PrepareOptions, prepare

    text = root / f"shakespeare-{key}.txt"
    text.write_text(shakespeare_text()[:chars], encoding="utf-8")
    out = root / f"data-{key}"
    prepare(PrepareOptions(source=str(text), out=out, val_tokens=val_tokens, workers=1, progress=False))
    _PREPARED[key] = out
    return out


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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spinning threads
    make every op wait for a core (see docs/performance.md); the training tests use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
