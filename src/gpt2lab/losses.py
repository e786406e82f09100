"""The training loss straight from the final hidden states: output projection and cross-entropy fused,
in chunks of tokens, without ever holding the (tokens x vocabulary) logits.

With GPT-2's 50257-token vocabulary the logits dwarf every other activation: 16 x 1024 tokens make a
3.3 GB float32 tensor, and the plain path writes it, copies it to float32, takes a log-softmax, and
writes its gradient, several passes over memory for little arithmetic. Here the tokens are processed
`chunk` rows at a time: the chunk's logits (small enough to stay in cache), its log-sum-exp and loss,
and right away the gradient of the loss with respect to the chunk's logits, softmax - one-hot, which
is multiplied into the gradients of the hidden states and of the weight. The backward pass then only
scales those by the incoming gradient. The arithmetic is the same three matmuls as the plain path;
the memory traffic of the softmax is gone. On a 2-core CPU this halves the time of the output layer
(bench/train_cpu.py). The idea is that of Liger Kernel's fused linear cross-entropy and of Apple's
"Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024).

Matmuls run in the autocast dtype when autocast is on (bf16), the softmax always in float32.
"""

from __future__ import annotations

import torch


def default_chunk(device: torch.device) -> int:
    """Rows per softmax chunk: a float32 (128, 50304) block (26 MB) stays in a CPU's last-level cache;
    GPUs want big matmuls."""
    return 128 if device.type == "cpu" else 4096


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
    ) -> torch.Tensor:
        N = hidden.size(0)
        valid = targets != -1  # (N,) -1 marks positions without a loss, as in F.cross_entropy(ignore_index=-1)
        n_valid = int(valid.sum())
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        h = hidden.to(compute_dtype)  # (N, C)
        w = weight.to(compute_dtype)  # (V_padded, C)
        scale = 1.0 / max(n_valid, 1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if needs_grad:
            grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V_padded, C)
            # d loss / d logits of 2 chunks, so that grad_w (the size of the embedding) is updated half
            # as often: each update reads and writes all of it.
            group = 2 * chunk
            g_buf = torch.empty(min(group, N), w.size(0), dtype=compute_dtype, device=hidden.device)
        else:
            group = chunk
        for g0 in range(0, N, group):
            g1 = min(g0 + group, N)
            for start in range(g0, g1, chunk):
                end = min(start + chunk, g1)
                t_c = targets[start:end].clamp(min=0)  # (c,)
                v_c = valid[start:end].float()  # (c,)
                logits = torch.mm(h[start:end], w.t()).float()  # (c, V_padded)
                logits[:, vocab_size:] = float("-inf")  # padding rows of the vocabulary are not tokens
                picked = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)  # (c,)
                peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
                exp = logits.sub_(peak).exp_()  # in place, one exp per logit: (c, V_padded)
                sums = exp.sum(dim=1)  # (c,)
                lse = peak.squeeze(1) + sums.log()  # (c,) log-sum-exp
                total += ((lse - picked) * v_c).sum()
                if needs_grad:
                    # softmax - one-hot, times the mean's 1 / n_valid (0 for ignored rows)
                    probs = exp.mul_((v_c * scale / sums).unsqueeze(1))
                    probs[torch.arange(end - start, device=probs.device), t_c] -= v_c * scale
                    g = g_buf[start - g0 : end - g0]
                    g.copy_(probs)
                    grad_h[start:end] = torch.mm(g, w)  # (c, C)
            if needs_grad:
                grad_w += torch.mm(g_buf[: g1 - g0].t(), h[g0:g1])  # (V_padded, C)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (logits over the first `vocab_size` rows) against targets.

    hidden: (N, C). weight: (V_padded, C), rows past vocab_size are padding. targets: (N,) token ids,
    -1 where no loss is wanted. Returns a scalar float32 tensor, equal (up to rounding) to
    F.cross_entropy((hidden @ weight.T)[:, :vocab_size], targets, ignore_index=-1).
    """
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    with torch.autocast(device_type=device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, dtype, chunk or default_chunk(device))
