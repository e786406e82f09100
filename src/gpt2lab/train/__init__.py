"""Training: the run's configuration (config.py), how a run is built (build.py) and the loop (loop.py),
AdamW and the schedule (optim.py), its checkpoints (checkpoint.py: the state as components, saved,
resumed and pruned), DDP and FSDP (parallel.py) and what is evaluated along the way (evaluate.py).

>>> from gpt2lab.train import load_train_config, train
>>> result = train(load_train_config("configs/shakespeare-cpu.toml", ["train.max_steps=50"]))

The names below are imported on first use (PEP 562): reading or printing a config loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# Public name -> the module that defines it.
_EXPORTS = {
    "TrainConfig": "config",
    "load_train_config": "config",
    "to_toml": "config",
    "TrainResult": "loop",
    "Trainer": "loop",
    "gradient_accumulation": "build",
    "train": "loop",
    "lr_at": "optim",
    "param_groups": "optim",
}

if TYPE_CHECKING:
    from .build import gradient_accumulation
    from .config import TrainConfig, load_train_config, to_toml
    from .loop import Trainer, TrainResult, train
    from .optim import lr_at, param_groups

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "gradient_accumulation",
    "load_train_config",
    "lr_at",
    "param_groups",
    "to_toml",
    "train",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
