"""The training loss straight from the final hidden states: output projection and cross-entropy fused,
in chunks of tokens, without ever holding the (tokens x vocabulary) logits.

With GPT-2's 50257-token vocabulary the logits dwarf every other activation: 16 x 1024 tokens make a
3.3 GB float32 tensor, and the plain path writes it, copies it to float32, takes a log-softmax, and
writes its gradient, several passes over memory for little arithmetic. Here the tokens are processed
`chunk` rows at a time: the chunk's logits (small enough to stay in cache), its log-sum-exp and loss,
and right away the gradient of the loss with respect to the chunk's logits, softmax - one-hot, which
is multiplied into the gradients of the hidden states and of the weight. The backward pass then only
scales those by the incoming gradient. The arithmetic is the same three matmuls as the plain path;
the memory traffic of the softmax is gone. The idea is that of Liger Kernel's fused linear
cross-entropy and of Apple's "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al.,
2024).

Two ways through a chunk:

- float32 on a CPU (`_cpu_float32`): every pass over the (vocabulary x chunk) block costs about as much
  as a third of its matmul, so the block is touched as few times as the math allows. The softmax is
  shifted by each token's *target* logit instead of the row maximum: that shift is a dot product per
  token, computed before the matmul and subtracted by it, as one more inner dimension (a column of
  ones beside the weight, the shift beside the hidden state; addmm's bias would cost a pass of its
  own). So there is no max pass and no subtraction pass, and the loss is simply log(sum(exp)) (the
  target's own term is exp(0) = 1 up to rounding, so the sum cannot underflow). Only a logit more
  than 88 above the target's (a loss over 88 nats) overflows float32: such a chunk is detected (a
  non-finite sum) and recomputed the usual way. Which exponential is fastest depends on the CPU: on an
  AMD EPYC `exp2` ran at the speed of a copy and twice as fast as `exp`, on an Intel Xeon `exp` was the
  faster one (by 2x with AVX2 kernels). With `exp2` the matmul's small operands are scaled by
  log2(e), so that the block holds base-2 exponents. The exponential, the chunk size and the block's
  layout are a `CpuLossKernel`, which the trainer measures once per machine (gpt2lab/tuning.py) and
  records in its checkpoints. Padding rows of the vocabulary are never computed, the block is never
  rescaled: the per-token factors 1 / (sum * tokens) go onto the small operands of the two gradient
  matmuls instead, and the one-hot part is a row gather and an `index_add_`.
- everything else (GPUs, bf16 autocast): the usual max-shifted softmax, with the matmuls in the
  autocast dtype and the softmax in float32.

Both keep the count of tokens as a tensor, so nothing waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import GPT2LabError

LOG2E = 1.0 / math.log(2.0)  # exp(x) = 2 ** (x * LOG2E)
EXPONENTIALS = ("exp2", "exp")
LAYOUTS = ("vocab-major", "token-major")


@dataclass(frozen=True)
class CpuLossKernel:
    """How the float32 CPU path walks the logits: `chunk` tokens at a time, with `exp` ("exp2": base-2
    exponents from a log2(e)-scaled matmul, or "exp"), in a block laid out `layout` ("vocab-major":
    (vocabulary x chunk), "token-major": (chunk x vocabulary)). Every choice computes the same loss
    and gradients up to float32 rounding; the rounding differs, so a run keeps its kernel when resumed.

    The default is what was fastest on an AMD EPYC (AVX-512): a (50257, 256) block's three matmuls ran
    20-30% faster there than a (50257, 128) block's, and exp2 twice as fast as exp. On an Intel Xeon
    128-token chunks and exp were faster, and with AVX2 kernels the token-major block too
    (docs/performance.md), hence the measurement in gpt2lab/tuning.py."""

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
