"""The training loss straight from the final hidden states: output projection and cross-entropy fused
in chunks of tokens, without ever holding the (tokens x vocabulary) logits.

With GPT-2's 50257-token vocabulary the logits dwarf every other activation, and the plain path writes
them, copies them to float32, takes a log-softmax and writes their gradient: several passes over memory
for little arithmetic. Here each chunk's logits stay in cache, and its loss and the gradient with
respect to its logits (softmax - one-hot) are computed at once and multiplied into the gradients of the
hidden states and of the weight; the backward pass only scales them. The idea is that of Liger Kernel's
fused linear cross-entropy and of "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et
al., 2024).

Two ways through a chunk: float32 on a CPU (`_cpu_float32`, which touches the block as few times as
the math allows; its chunk, exponential and layout are a `CpuLossKernel` chosen per machine by
tuning.py), and the usual max-shifted softmax everywhere else (GPUs, bf16 autocast).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import GPT2LabError
from ..model import GPT

LOG2E = 1.0 / math.log(2.0)  # exp(x) = 2 ** (x * LOG2E)
EXPONENTIALS = ("exp2", "exp")
LAYOUTS = ("vocab-major", "token-major")


@dataclass(frozen=True)
class CpuLossKernel:
    """How the float32 CPU path walks the logits: `chunk` tokens at a time, with `exp` ("exp2": base-2
    exponents from a log2(e)-scaled matmul, or "exp"), in a block laid out `layout` ("vocab-major":
    (vocabulary x chunk), "token-major": (chunk x vocabulary)). Every choice computes the same loss
    and gradients up to float32 rounding; the rounding differs, so a run keeps its kernel when resumed.
    Which is fastest depends on the CPU (docs/performance.md, "The fused loss"), hence tuning.py."""

    chunk: int = 256
    exp: str = "exp2"
    layout: str = "vocab-major"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise GPT2LabError(f"CPU loss kernel: chunk must be a positive integer, got {self.chunk!r}")
        if self.exp not in EXPONENTIALS:
            raise GPT2LabError(f"CPU loss kernel: exp must be one of {', '.join(EXPONENTIALS)}, got {self.exp!r}")
        if self.layout not in LAYOUTS:
            raise GPT2LabError(f"CPU loss kernel: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuLossKernel:
        try:
            return cls(chunk=d["chunk"], exp=d["exp"], layout=d["layout"])
        except (KeyError, TypeError):
            raise GPT2LabError(
                f"CPU loss kernel: expected {{'chunk': N, 'exp': 'exp2' or 'exp', 'layout': 'vocab-major' or "
                f"'token-major'}}, got {d!r}"
            ) from None

    def __str__(self) -> str:
        return f"chunks of {self.chunk} tokens, {self.exp}, {self.layout}"


def default_chunk(device: torch.device) -> int:
    """Tokens per chunk when no kernel is given: on a CPU the default kernel's; GPUs want big matmuls."""
    return CpuLossKernel().chunk if device.type == "cpu" else 4096


def _cpu_float32(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    vocab_size: int,
    chunk: int,
    needs_grad: bool,
    base2: bool = True,
    token_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum over tokens of weights * cross-entropy, and its gradients (already times `weights`).

    h: (N, C) float32, w: (V_padded, C), targets: (N,) in [0, vocab_size), weights: (N,) float32 (the
    mean's 1 / n_valid, 0 for ignored tokens). base2: exp2 of log2(e)-scaled logits, else exp.
    token_major: blocks of (chunk, V), else (V, chunk).
    Returns total (scalar), grad_h (N, C), grad_w (V_padded, C).
    """
    N, C = h.shape
    wv = w[:vocab_size]  # (V, C): the padding rows take no part
    w_t = wv.index_select(0, targets)  # (N, C) each token's target row
    picked = (h * w_t).sum(1)  # (N,) target logits: the shift of each token's softmax
    total = torch.zeros((), dtype=torch.float32)
    grad_h = grad_w = None
    if needs_grad:
        grad_h = torch.empty_like(h)
        grad_w = torch.empty(w.shape, dtype=torch.float32)
        grad_w[vocab_size:] = 0  # the padding rows; the first chunk writes the others
    # One block for every chunk: writing into memory already touched is faster than a fresh 51 MB tensor
    # per chunk, and MKL's sgemm (into `out`) beat oneDNN's matmul on these shapes on an AVX2 CPU.
    rows = min(chunk, N)
    buf = torch.empty((rows, vocab_size) if token_major else (vocab_size, rows), dtype=torch.float32)
    # The shift is one more inner dimension of the matmul: [w, 1] . [h, -picked] = logit - picked, times
    # log2(e) for exp2 (the base-2 exponents). addmm would first copy the bias into all of the block.
    scale = LOG2E if base2 else 1.0
    w1 = torch.empty(vocab_size, C + 1, dtype=torch.float32)  # (V, C + 1)
    w1[:, :C] = wv
    w1[:, C] = 1.0
    h1 = torch.empty(N, C + 1, dtype=torch.float32)  # (N, C + 1)
    torch.mul(h, scale, out=h1[:, :C])
    torch.mul(picked, -scale, out=h1[:, C])
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        hc, a = h[s:e], weights[s:e]  # (c, C), (c,)
        # exp(logit - target logit), or 2 ** ((logit - target logit) * log2 e). Et is the block as
        # (V, c) whatever its layout.
        if token_major:
            E = torch.mm(h1[s:e], w1.t(), out=buf[: e - s])  # (c, V)
            Et = E.t()
        else:
            E = Et = torch.mm(w1, h1[s:e].t(), out=buf[:, : e - s])  # (V, c)
        E = E.exp2_() if base2 else E.exp_()
        sums = Et.sum(0)  # (c,) >= 1
        if not bool(torch.isfinite(sums).all()):
            # A logit 88 above the target's overflowed: this chunk the usual way (the check reads a CPU
            # tensor, no device to wait for).
            sub = _shifted(hc, w, targets[s:e], a, vocab_size, torch.float32, chunk, needs_grad)
            total += sub[0]
            if needs_grad:
                grad_h[s:e] = sub[1]
                if s == 0:
                    grad_w.copy_(sub[2])
                else:
                    grad_w += sub[2]
            continue
        total += (sums.log() * a).sum()  # log(sum exp(logit - picked)) = log-sum-exp - picked = the loss
        if needs_grad:
            # d/d logits = a * (softmax - one-hot) = (a / sums) * E - a * one-hot
            r = a / sums  # (c,)
            gh = torch.mm(Et.t(), wv)  # (c, C)
            grad_h[s:e] = torch.addcmul(gh * r.unsqueeze(1), w_t[s:e], a.unsqueeze(1), value=-1.0)
            if s == 0:  # the first chunk writes grad_w instead of adding to zeros
                torch.mm(Et, hc * r.unsqueeze(1), out=grad_w[:vocab_size])
            else:
                grad_w[:vocab_size].addmm_(Et, hc * r.unsqueeze(1))
            grad_w.index_add_(0, targets[s:e], hc * a.unsqueeze(1), alpha=-1.0)
    return total, grad_h, grad_w


def _shifted(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    vocab_size: int,
    compute_dtype: torch.dtype,
    chunk: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """As _cpu_float32, with a max-shifted float32 softmax and matmuls in compute_dtype, on any device."""
    N = h.size(0)
    device = h.device
    hd, wd = h.to(compute_dtype), w.to(compute_dtype)  # (N, C), (V_padded, C)
    total = torch.zeros((), dtype=torch.float32, device=device)
    grad_h = grad_w = None
    if needs_grad:
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=device)  # (N, C)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=device)  # (V_padded, C)
        # d loss / d logits of 2 chunks, so that grad_w (the size of the embedding) is updated half
        # as often: each update reads and writes all of it.
        group = 2 * chunk
        g_buf = torch.empty(min(group, N), wd.size(0), dtype=compute_dtype, device=device)
    else:
        group = chunk
    for g0 in range(0, N, group):
        g1 = min(g0 + group, N)
        for start in range(g0, g1, chunk):
            end = min(start + chunk, g1)
            t_c, a = targets[start:end], weights[start:end]  # (c,), (c,)
            logits = torch.mm(hd[start:end], wd.t()).float()  # (c, V_padded)
            logits[:, vocab_size:] = float("-inf")  # padding rows of the vocabulary are not tokens
            picked = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)  # (c,)
            peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
            exp = logits.sub_(peak).exp_()  # in place, one exp per logit: (c, V_padded)
            sums = exp.sum(dim=1)  # (c,)
            lse = peak.squeeze(1) + sums.log()  # (c,) log-sum-exp
            total += ((lse - picked) * a).sum()
            if needs_grad:
                probs = exp.mul_((a / sums).unsqueeze(1))  # a * softmax
                probs[torch.arange(end - start, device=device), t_c] -= a  # - a * one-hot
                g = g_buf[start - g0 : end - g0]
                g.copy_(probs)
                grad_h[start:end] = torch.mm(g, wd)  # (c, C)
        if needs_grad:
            grad_w += torch.mm(g_buf[: g1 - g0].t(), hd[g0:g1])  # (V_padded, C)
    return total, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        vocab_size: int,
        compute_dtype: torch.dtype,
        chunk: int,
        base2: bool,
        token_major: bool,
    ) -> torch.Tensor:
        valid = targets != -1  # (N,) -1 marks positions without a loss, as in F.cross_entropy(ignore_index=-1)
        # The mean's 1 / n_valid per token (0 where ignored), kept on the device: no host read.
        weights = valid.float() / valid.sum().clamp(min=1)  # (N,)
        t = targets.clamp(min=0)  # (N,)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        fast = (
            hidden.device.type == "cpu"
            and compute_dtype == torch.float32
            and hidden.dtype == torch.float32
            and weight.dtype == torch.float32
        )
        if fast:
            total, grad_h, grad_w = _cpu_float32(
                hidden.contiguous(), weight.contiguous(), t, weights, vocab_size, chunk, needs_grad, base2, token_major
            )
        else:
            total, grad_h, grad_w = _shifted(hidden, weight, t, weights, vocab_size, compute_dtype, chunk, needs_grad)
        if needs_grad:
            ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_out.device.type == "cpu" and grad_out.numel() == 1 and grad_out.item() == 1.0:
            # loss.backward() of the loss itself: the gradients are ready, no pass over grad_w's 25 MB
            # (GPT-2's) to multiply them by 1. (A CPU scalar: reading it waits for nothing.)
            return grad_h, grad_w, None, None, None, None, None, None
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk: int | None = None,
    kernel: CpuLossKernel | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (logits over the first `vocab_size` rows) against targets.

    hidden: (N, C). weight: (V_padded, C), rows past vocab_size are padding. targets: (N,) token ids,
    -1 where no loss is wanted. kernel: the float32 CPU path's chunk, exponential and layout (default
    CpuLossKernel()); `chunk` overrides its chunk, and is the only choice on other paths. Returns a
    scalar float32 tensor, equal (up to rounding) to
    F.cross_entropy((hidden @ weight.T)[:, :vocab_size], targets, ignore_index=-1).
    """
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    k = kernel or CpuLossKernel()
    chunk = chunk or (k.chunk if device.type == "cpu" else default_chunk(device))
    with torch.autocast(device_type=device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden,
            weight,
            targets,
            vocab_size,
            dtype,
            chunk,
            k.exp == "exp2",
            k.layout == "token-major",
        )


def use_fused_loss(model: GPT, kernel: CpuLossKernel | None = None) -> GPT:
    """Make `model(idx, targets)` return `(None, loss)` with the loss computed by `linear_cross_entropy`
    from the model's hidden states; without targets, and inside torch.compile (where Inductor fuses the
    plain loss itself), the model's own forward runs. The forward is replaced on this instance only, so
    DDP, FSDP and torch.compile wrap it as they wrap the model. A no-op where GPT2LAB_ACCEL=0."""
    from . import enabled

    if not enabled():
        return model
    plain = type(model).forward

    def forward(idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        if targets is None or cache is not None or torch.compiler.is_compiling():
            return plain(model, idx, targets, cache)
        x = model.hidden_states(idx)  # (B, T, C)
        loss = linear_cross_entropy(
            x.reshape(-1, x.size(-1)), model.lm_head.weight, targets.reshape(-1), model.config.vocab_size, kernel=kernel
        )
        return None, loss

    model.forward = forward
    return model
