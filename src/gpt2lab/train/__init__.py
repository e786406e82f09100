"""Training: the loop (loop.py), AdamW and the schedule (optim.py), torchrun plumbing (distributed.py),
the starting model (build.py) and what is evaluated along the way (evaluate.py).

>>> from gpt2lab.config import load_train_config
>>> from gpt2lab.train import train
>>> result = train(load_train_config("configs/shakespeare-cpu.toml", ["train.max_steps=50"]))
"""

from .loop import Trainer, TrainResult, gradient_accumulation, train
from .optim import lr_at, param_groups

__all__ = ["TrainResult", "Trainer", "gradient_accumulation", "lr_at", "param_groups", "train"]
