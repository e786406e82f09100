"""8-bit weights for inference on a CPU: `quantize_int8` swaps every nn.Linear for an `Int8Linear`.

Each weight row (one output channel) is stored as int8 with its own float scale, max |w| / 127, a
quarter of float32's bytes, which is what batch-1 decoding is bound by. The product is torch's
dynamically quantized linear kernel (`quantized::linear_dynamic`, fbgemm or oneDNN): the activations
are rounded to 8 bits at each call with one scale for the whole input, then multiplied in integers, as
llama.cpp's q8_0 also multiplies 8-bit activations. Where the CPU has no VNNI instructions, the kernel's
16-bit sums of two 8-bit products could overflow, so there the activations keep 7 bits
(`reduce_range`). The kernel that keeps float activations (`aten._weight_int8pack_mm`) streamed the
weights several times slower on the CPUs measured (docs/performance.md, "Decoding at the memory
limit"); it is the fallback for a build of torch without quantized tensors, which torch has deprecated.

Activations, the KV cache, the embeddings and the logits stay float32. An `Int8Linear` keeps the
nn.Linear's float parameters too (same names, the same tied head, the same state dict), unread while
decoding: int8 makes decoding faster, not the model smaller in memory. An int8 model is for inference
only; `dequantize` puts the nn.Linear modules back. Rows decoded together share the activations'
scale, so a row's logits depend, within the rounding, on the rows beside it.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn as nn

from ..errors import GPT2LabError
from ..model import GPT
from .packing import modules_of_type, put_modules, unpack


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    """Whether the CPU multiplies-and-adds 8-bit integers into 32-bit sums (AVX512-VNNI or AVX-VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight (out, in) -> (int8 (out, in), float32 scales (out,)),
    weight ~= int8 * scales[:, None]."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """An nn.Linear's product with int8 weights (per-output-channel scales) and 8-bit activations:
    (..., in) float32 -> (..., out) float32. Its `weight` and `bias` are the nn.Linear's (the weight
    unread). kernel: "dynamic" or "weight-only", see the module's docstring."""

    def __init__(self, linear: nn.Linear, reduce_range: bool | None = None, kernel: str | None = None) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.__dict__["plain"] = linear  # what `dequantize` puts back; not a submodule
        self.q, self.scales = quantize_rows(linear.weight)  # (out, in) int8, (out,)
        self.reduce_range = not has_vnni() if reduce_range is None else reduce_range
        self.kernel = kernel or ("dynamic" if dynamic_kernel_available() else "weight-only")
        if self.kernel not in ("dynamic", "weight-only"):
            raise ValueError(f"kernel must be 'dynamic' or 'weight-only', got {kernel!r}")
        if self.kernel == "dynamic":
            zeros = torch.zeros(self.q.size(0), dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated: see the module's docstring
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(self.q, self.scales.double(), zeros, 0)
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            self.q = None  # the prepacked copy is the one read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        if self.kernel == "dynamic":
            y = torch.ops.quantized.linear_dynamic(rows, self.packed, self.reduce_range)  # (N, out)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scales)  # (N, out)
            if self.bias is not None:
                y = y + self.bias.float()
        return y.view(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo: dict) -> Int8Linear:
        return Int8Linear(copy.deepcopy(self.plain, memo), self.reduce_range, self.kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@functools.cache
def dynamic_kernel_available() -> bool:
    """Whether this build of torch has the dynamically quantized linear kernel (fbgemm or oneDNN)."""
    return hasattr(torch.ops.quantized, "linear_dynamic") and any(
        e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn")
    )


def quantize_int8(model: GPT, reduce_range: bool | None = None, kernel: str | None = None) -> GPT:
    """Swap every nn.Linear of a float32 CPU model for an `Int8Linear`, in place; returns the model, for
    inference only from then on. `reduce_range`: 7-bit activations (default: where the CPU lacks VNNI);
    `kernel`: "dynamic" or "weight-only" (default: "dynamic" where torch has it), see the module's
    docstring."""
    if model.device.type != "cpu" or model.lm_head.weight.dtype != torch.float32:
        raise GPT2LabError(
            f"int8 weights are made from a float32 model on the CPU, not {model.lm_head.weight.dtype} on "
            f"{model.device.type}: load it with --device cpu"
        )
    unpack(model)
    try:
        slots = modules_of_type(model, nn.Linear)
        put_modules([(parent, name, Int8Linear(m, reduce_range, kernel)) for parent, name, m in slots])
    except RuntimeError as e:  # a build of torch without fbgemm or oneDNN's quantized kernels
        dequantize(model)
        raise GPT2LabError(f"this build of torch cannot multiply int8 weights ({e}): use --dtype bfloat16") from None
    return model.eval()


def dequantize(model: nn.Module) -> nn.Module:
    """Give the model its nn.Linear modules back (a no-op for a model never quantized)."""
    put_modules([(parent, name, m.plain) for parent, name, m in modules_of_type(model, Int8Linear)])
    return model


def is_int8(model: nn.Module) -> bool:
    return bool(modules_of_type(model, Int8Linear))
