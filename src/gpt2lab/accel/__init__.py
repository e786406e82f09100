"""Speed applied to a GPT from outside: the model file stays plain GPT-2, and these take a model and
make it faster without changing what it computes.

- `pack_for_inference` / `unpack` (packing.py): the layout decoding reads the weights in on a CPU
  (nn.Linear's own, a transposed copy, or oneDNN's packed copy), whichever a timing on this machine
  says is fastest.
- `quantize_int8` / `dequantize` (int8.py): 8-bit weights with per-channel scales for CPU inference,
  `--dtype int8` on the command line (`inference_dtype` and `apply_inference_dtype` read that name).
- `use_fused_loss` (loss.py): the training loss straight from the final hidden states, output
  projection and cross-entropy fused in chunks, never holding the (tokens x vocabulary) logits.
- `choose_cpu_loss_kernel` (tuning.py): which variant of that loss is fastest on this CPU, measured once
  and kept in gpt2lab's cache.

`GPT2LAB_ACCEL=0` turns all of it off: every model then runs as model.py writes it.
Measurements: docs/performance.md; the environment variables: docs/cpu.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .int8 import Int8Linear, dequantize, is_int8, quantize_int8
from .loss import CpuLossKernel, linear_cross_entropy, use_fused_loss
from .packing import LAYOUTS, layout_of, pack_for_inference, unpack
from .tuning import choose_cpu_loss_kernel

if TYPE_CHECKING:
    from ..model import GPT

__all__ = [
    "INFERENCE_DTYPES",
    "LAYOUTS",
    "CpuLossKernel",
    "Int8Linear",
    "apply_inference_dtype",
    "choose_cpu_loss_kernel",
    "dequantize",
    "enabled",
    "inference_dtype",
    "is_int8",
    "layout_of",
    "linear_cross_entropy",
    "pack_for_inference",
    "quantize_int8",
    "unpack",
    "use_fused_loss",
]

# What `--dtype` accepts for inference (sample, serve, eval): the weights' dtype, or int8 weights.
INFERENCE_DTYPES = ("float32", "bfloat16", "float16", "int8")


def enabled() -> bool:
    """False where GPT2LAB_ACCEL=0: the plain model everywhere."""
    return os.environ.get("GPT2LAB_ACCEL", "1") != "0"


def inference_dtype(name: str) -> str:
    """The dtype to load the weights in for `--dtype name`: int8 weights are made from float32 ones."""
    return "float32" if name.lower() == "int8" else name


def apply_inference_dtype(model: GPT, name: str) -> GPT:
    """Make a model loaded in `inference_dtype(name)` what `--dtype name` asks for: int8 weights for
    "int8" (quantize_int8, which refuses with GPT2LAB_ACCEL=0's plain model off), else as it is."""
    if name.lower() != "int8":
        return model
    from ..errors import GPT2LabError

    if not enabled():
        raise GPT2LabError("--dtype int8 needs gpt2lab's accelerations: unset GPT2LAB_ACCEL=0")
    return quantize_int8(model)
