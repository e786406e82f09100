"""Speed applied to a GPT from outside: the model file stays plain GPT-2, and these take a model and
make it faster without changing what it computes.

- `pack_for_inference` / `unpack` (packing.py): oneDNN-packed weights for CPU decoding, used where a
  timing on this machine says they pay.
- `use_fused_loss` (loss.py): the training loss straight from the final hidden states, output
  projection and cross-entropy fused in chunks, never holding the (tokens x vocabulary) logits.
- `choose_cpu_loss_kernel` (tuning.py): which variant of that loss is fastest on this CPU, measured once
  and kept in gpt2lab's cache.

`GPT2LAB_ACCEL=0` turns all of it off: every model then runs as model.py writes it.
Measurements: docs/performance.md; the environment variables: docs/cpu.md.
"""

from __future__ import annotations

import os

from .loss import CpuLossKernel, linear_cross_entropy, use_fused_loss
from .packing import pack_for_inference, unpack
from .tuning import choose_cpu_loss_kernel

__all__ = [
    "CpuLossKernel",
    "choose_cpu_loss_kernel",
    "enabled",
    "linear_cross_entropy",
    "pack_for_inference",
    "unpack",
    "use_fused_loss",
]


def enabled() -> bool:
    """False where GPT2LAB_ACCEL=0: the plain model everywhere."""
    return os.environ.get("GPT2LAB_ACCEL", "1") != "0"
