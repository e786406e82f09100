"""oneDNN-packed weights for decoding on a CPU.

Decoding multiplies a few rows by every weight of the model for each new token, so it is bound by
reading the weights, and oneDNN's blocked layout streams them faster than nn.Linear's (out, in) matrix
on some CPUs and slower on others (docs/performance.md, "Generation"). So `pack_for_inference` times a
decoding step both ways once per machine, shape and batch size (tuning.py), and swaps each nn.Linear for
a `PackedLinear` only where packing wins. A `PackedLinear` holds the very same parameters (same names,
same tied head) plus a packed copy used without autograd while the weight is unchanged; `unpack` puts
the original modules back.
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, KVCache
from .tuning import packing_pays


class PackedLinear(nn.Module):
    """An nn.Linear's parameters and a oneDNN-packed copy of its weight tuned for `batch_size` rows."""

    def __init__(self, linear: nn.Linear, batch_size: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.batch_size = batch_size
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size)
        self.packed_for = (linear.weight.data_ptr(), linear.weight._version)  # the weight as packed
        self.__dict__["plain"] = linear  # what `unpack` puts back; not a submodule

    def fresh(self) -> bool:
        return (self.weight.data_ptr(), self.weight._version) == self.packed_for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == self.packed.dtype and x.device.type == "cpu" and self.fresh():
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


# Models for which the plain weights were measured faster, and at which batch size: asked once.
_plain_at: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _slots(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every submodule of type `kind`."""
    return [(p, name, m) for p in model.modules() for name, m in p.named_children() if isinstance(m, kind)]


def _put(slots: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, module in slots:
        setattr(parent, name, module)


def unpack(model: nn.Module) -> nn.Module:
    """Give the model its plain nn.Linear modules back (a no-op for a model never packed)."""
    _put([(parent, name, packed.plain) for parent, name, packed in _slots(model, PackedLinear)])
    return model


def _usable(model: GPT) -> bool:
    from . import enabled

    return (
        enabled()
        and model.device.type == "cpu"
        and model.lm_head.weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


def pack_for_inference(model: GPT, batch_size: int) -> bool:
    """Pack the model's weights for decoding `batch_size` rows on a CPU, where that is faster on this
    machine than the plain weights; returns whether packed weights are in use. Elsewhere (a GPU, another
    dtype, GPT2LAB_ACCEL=0) the model is left plain. Costs one more copy of the weights while packed."""
    if not _usable(model) or _plain_at.get(model) == batch_size:
        unpack(model)
        return False
    packed = [m for _, _, m in _slots(model, PackedLinear)]
    if packed and all(m.fresh() and m.batch_size == batch_size for m in packed):
        return True
    c, dtype = model.config, str(model.lm_head.weight.dtype).removeprefix("torch.")
    shape = f"{dtype} | {c.n_layer} layers x {c.n_embd} wide, vocab {c.padded_vocab_size}"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if packing_pays(shape, weight_bytes, batch_size, None) is False:
        return _keep_plain(model, batch_size)
    unpack(model)
    try:
        _put([(parent, name, PackedLinear(m, batch_size)) for parent, name, m in _slots(model, nn.Linear)])
    except RuntimeError:  # a build of torch without these oneDNN kernels
        unpack(model)
        return False
    if not packing_pays(shape, weight_bytes, batch_size, lambda: time_decode_step(model, batch_size)):
        return _keep_plain(model, batch_size)
    return True


def _keep_plain(model: GPT, batch_size: int) -> bool:
    unpack(model)
    _plain_at[model] = batch_size
    return False


@torch.inference_mode()
def time_decode_step(model: GPT, batch_size: int, rounds: int = 3, context: int = 32) -> dict[str, float]:
    """Fastest seconds of one decoding step (a token per row after `context` cached ones) with the
    packed weights and with the plain ones, taking turns. The model must be packed."""
    ctx = min(context, model.config.block_size - 1)
    cache = KVCache(model.config, batch_size, ctx + 1, device=model.device, dtype=model.lm_head.weight.dtype)
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
    model.hidden_states(torch.zeros(batch_size, ctx, dtype=torch.long, device=model.device), cache)
    packed = _slots(model, PackedLinear)
    plain = [(parent, name, m.plain) for parent, name, m in packed]
    best = {"packed": float("inf"), "plain": float("inf")}
    try:
        for _ in range(rounds):
            for way, slots in (("packed", packed), ("plain", plain)):
                _put(slots)
                cache.pos[:] = [ctx] * batch_size
                t0 = time.perf_counter()
                model.head(model.hidden_states(idx, cache))
                best[way] = min(best[way], time.perf_counter() - t0)
    finally:
        _put(packed)
    return best
