"""Weight layouts for decoding on a CPU.

Decoding multiplies a few rows by every weight of the model for each new token, so it is bound by
reading the weights, and how fast a matrix-vector product streams them depends on their layout and the
kernel that reads it (docs/performance.md, "Decoding at the memory limit"). Three layouts serve an
nn.Linear's product:

- "plain": nn.Linear's own (out, in) weight, multiplied through F.linear;
- "transposed": a contiguous (in, out) copy, so the product reads the weight row after row (`addmm`);
- "packed": oneDNN's blocked copy of the weight, tuned for the batch size.

Which is fastest differs between CPUs and batch sizes, so `pack_for_inference` times a decoding step in
each layout once per machine, shape, dtype and batch size (tuning.py) and swaps each nn.Linear for a
`TransposedLinear` or `PackedLinear` where one of them wins. These hold the very same parameters (same
names, same tied head) plus their copy, used without autograd while the weight is unchanged; `unpack`
puts the original modules back.
"""

from __future__ import annotations

import abc
import copy
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT, KVCache
from .tuning import decode_layout

LAYOUTS = ("plain", "transposed", "packed")


class _CopiedLinear(nn.Module, abc.ABC):
    """An nn.Linear's parameters and a copy of its weight in another layout, used by `forward` without
    autograd, on the CPU and in the copy's dtype while the weight is the one copied."""

    layout = ""

    def __init__(self, linear: nn.Linear, batch_size: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.batch_size = batch_size
        self.copy = self.make_copy(linear.weight.detach(), batch_size)
        self.copied_from = (linear.weight.data_ptr(), linear.weight._version)  # the weight as copied
        self.__dict__["plain"] = linear  # what `unpack` puts back; not a submodule

    @abc.abstractmethod
    def make_copy(self, weight: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The weight (out, in) in this layout."""

    @abc.abstractmethod
    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T + bias from the copy: (..., in) -> (..., out)."""

    def fresh(self) -> bool:
        return (self.weight.data_ptr(), self.weight._version) == self.copied_from

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        return copy.deepcopy(self.plain, memo)  # a copy of the model is plain (oneDNN's copy cannot be copied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == self.copy.dtype and x.device.type == "cpu" and self.fresh():
            return self.product(x)
        return F.linear(x, self.weight, self.bias)


class TransposedLinear(_CopiedLinear):
    """The weight copied as a contiguous (in, out) matrix: (..., in) -> (..., out) through `addmm`."""

    layout = "transposed"

    def make_copy(self, weight: torch.Tensor, batch_size: int) -> torch.Tensor:
        return weight.t().contiguous()  # (in, out)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))  # (N, in)
        y = torch.mm(rows, self.copy) if self.bias is None else torch.addmm(self.bias, rows, self.copy)
        return y.view(*x.shape[:-1], y.size(-1))


class PackedLinear(_CopiedLinear):
    """The weight in oneDNN's blocked layout for `batch_size` rows."""

    layout = "packed"

    def make_copy(self, weight: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.copy, self.bias, "none", [], "")


_KINDS: dict[str, type[_CopiedLinear]] = {"transposed": TransposedLinear, "packed": PackedLinear}
# The layout each model was last measured or told to use, and at which batch size: asked once.
_chosen: weakref.WeakKeyDictionary[nn.Module, tuple[int, str]] = weakref.WeakKeyDictionary()


def modules_of_type(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every submodule of type `kind`."""
    return [(p, name, m) for p in model.modules() for name, m in p.named_children() if isinstance(m, kind)]


def put_modules(slots: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, module in slots:
        setattr(parent, name, module)


def unpack(model: nn.Module) -> nn.Module:
    """Give the model its plain nn.Linear modules back (a no-op for a model never packed)."""
    put_modules([(parent, name, copied.plain) for parent, name, copied in modules_of_type(model, _CopiedLinear)])
    return model


def layout_of(model: nn.Module) -> str:
    """The layout the model's linear layers decode with now: "plain", "transposed" or "packed"."""
    copied = [m for _, _, m in modules_of_type(model, _CopiedLinear)]
    return copied[0].layout if copied else "plain"


def _use(model: nn.Module, layout: str, batch_size: int) -> bool:
    """Put every nn.Linear in `layout`; False where this build of torch cannot make that copy."""
    unpack(model)
    if layout == "plain":
        return True
    try:
        put_modules([(p, name, _KINDS[layout](m, batch_size)) for p, name, m in modules_of_type(model, nn.Linear)])
    except RuntimeError:  # a build of torch without these oneDNN kernels
        unpack(model)
        return False
    return True


def _usable(model: GPT) -> bool:
    from . import enabled

    return (
        enabled()
        and model.device.type == "cpu"
        and model.lm_head.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and bool(modules_of_type(model, nn.Linear) or modules_of_type(model, _CopiedLinear))  # none in an int8 model
    )


def _layouts(model: GPT) -> tuple[str, ...]:
    """The layouts to try: oneDNN packs float32 and bfloat16 weights only."""
    packs = model.lm_head.weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
    return LAYOUTS if packs else tuple(lay for lay in LAYOUTS if lay != "packed")


def pack_for_inference(model: GPT, batch_size: int, layout: str | None = None) -> str:
    """Lay the model's weights out for decoding `batch_size` rows on a CPU in the layout measured
    fastest on this machine (or `layout`, one of LAYOUTS); returns the layout in use. Elsewhere (a GPU,
    GPT2LAB_ACCEL=0, int8 weights) the model is left plain. A layout other than "plain" costs one more
    copy of the weights while in use."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not _usable(model):
        unpack(model)
        return "plain"
    copied = [m for _, _, m in modules_of_type(model, _CopiedLinear)]
    settled = bool(copied) and all(m.fresh() and m.batch_size == batch_size for m in copied)
    if layout is None:
        if settled or (not copied and _chosen.get(model) == (batch_size, "plain")):
            return layout_of(model)
        layout = _measured_layout(model, batch_size)
    elif settled and layout == layout_of(model):
        return layout
    copied = [m for _, _, m in modules_of_type(model, _CopiedLinear)]  # a timing leaves the model plain
    if copied and layout == "transposed" == layout_of(model) and all(m.fresh() for m in copied):
        for m in copied:  # the same copy serves every batch size
            m.batch_size = batch_size
    elif layout not in _layouts(model) or not _use(model, layout, batch_size):
        layout = "plain"
        unpack(model)
    _chosen[model] = (batch_size, layout)
    return layout


def _measured_layout(model: GPT, batch_size: int) -> str:
    c, dtype = model.config, str(model.lm_head.weight.dtype).removeprefix("torch.")
    shape = f"{dtype} | {c.n_layer} layers x {c.n_embd} wide, vocab {c.padded_vocab_size}"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layouts = _layouts(model)
    return decode_layout(shape, weight_bytes, batch_size, lambda: time_decode_step(model, batch_size, layouts=layouts))


@torch.inference_mode()
def time_decode_step(
    model: GPT, batch_size: int, rounds: int = 5, context: int = 32, layouts: tuple[str, ...] = LAYOUTS
) -> dict[str, float]:
    """Fastest seconds of one decoding step (a token per row after `context` cached ones) in each of
    `layouts` that this build of torch can make, taking turns; the model is left plain."""
    ctx = min(context, model.config.block_size - 1)
    cache = KVCache(model.config, batch_size, ctx + 1, device=model.device, dtype=model.lm_head.weight.dtype)
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
    unpack(model)
    model.hidden_states(torch.zeros(batch_size, ctx, dtype=torch.long, device=model.device), cache)
    plain = modules_of_type(model, nn.Linear)
    ways: dict[str, list] = {}
    for layout in layouts:
        if _use(model, layout, batch_size):
            ways[layout] = modules_of_type(model, _CopiedLinear) if layout != "plain" else plain
        unpack(model)
    best = dict.fromkeys(ways, float("inf"))
    try:
        for _ in range(rounds):
            for layout, slots in ways.items():
                put_modules(slots)
                cache.pos[:] = [ctx] * batch_size
                t0 = time.perf_counter()
                model.head(model.hidden_states(idx, cache))
                best[layout] = min(best[layout], time.perf_counter() - t0)
    finally:
        put_modules(plain)
    return best
