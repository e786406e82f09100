"""One KV cache shared by every sequence the server decodes, and the decode step over all of them.

Each running sequence owns a slot of the pool: a row of keys and values as long as the model's context.
Sequences are at different positions, so the decode step gives each row its own position embedding and
its own attention length; everything else (the matrix products, which read every weight once per step)
runs on the whole batch. That is where batching pays on a CPU: decoding one token is bound by reading
the weights, and a batch of rows shares one read.

Shapes: S slots, B rows in a step, L = block_size, C = n_embd, nh = n_head, hs = C // nh, V = vocab size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import GPTConfig
from ..model import GPT, KVCache


class SlotCache(KVCache):
    """A KVCache whose tensors are one slot of a SlotPool, so `GPT.forward` prefills straight into it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:  # (n_layer, 1, nh, L, hs) views
        # No KVCache.__init__: that allocates; these tensors are views of the pool's storage.
        self.k = k
        self.v = v
        self.max_len = k.size(3)
        self.pos = 0


class SlotPool:
    """Keys and values of `slots` sequences: `k` and `v` are (n_layer, S, nh, L, hs), allocated once, so
    the server's memory does not grow with the traffic."""

    def __init__(self, config: GPTConfig, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.n_layer, slots, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slots = slots

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def view(self, slot: int) -> SlotCache:
        return SlotCache(self.k[:, slot : slot + 1], self.v[:, slot : slot + 1])

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` the first `length` positions of slot `src` (n > 1 choices share a prompt)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@torch.inference_mode()
def prefill(model: GPT, pool: SlotPool, slot: int, prompt: Sequence[int]) -> torch.Tensor:
    """Run the prompt through the model into `slot`; returns the next-token logits (1, V).

    This is the call `generate` makes for its prompt (one row, the whole prompt, `last_only`), so the
    first token of a request is computed exactly as `gpt2lab sample` computes it.
    """
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)  # (1, T)
    logits, _ = model(idx, cache=pool.view(slot), last_only=True)
    return logits[:, -1, :]  # (1, V)


@torch.inference_mode()
def prompt_logprobs(model: GPT, prompt: Sequence[int], top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `echo` with `logprobs`: log p(prompt[t] | prompt[:t]) for t >= 1, (T - 1,), and the `top_n`
    most likely tokens at each of those positions, log-probabilities and ids, (T - 1, top_n) each.

    A separate pass without the cache, so the prefill stays the exact call `generate` makes."""
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)  # (1, T)
    logits, _ = model(idx)  # (1, T, V)
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T - 1, V)
    chosen = logp.gather(1, idx[0, 1:].unsqueeze(1)).squeeze(1)  # (T - 1,)
    top = torch.topk(logp, top_n, dim=-1)
    return chosen, top.values, top.indices


@torch.inference_mode()
def decode_step(
    model: GPT, pool: SlotPool, slots: Sequence[int], positions: Sequence[int], tokens: Sequence[int]
) -> torch.Tensor:
    """Feed one token to each of B sequences; returns their next-token logits (B, V).

    Row b is `tokens[b]` at position `positions[b]` of slot `slots[b]`, whose first `positions[b]`
    positions are already in the pool. This is `GPT.forward` with a cache (model.py) with one position
    per row: the matrix products take the whole batch, and each row attends over its own keys with the
    same call, on tensors of the same shape, as a lone sequence does.

    A lone row is decoded as two identical rows. Matrix kernels may pick their summation order by the
    number of rows: on an AVX-512 CPU, oneDNN's one-row product for the MLP's c_proj rounds otherwise
    than its two-or-more-row one, and those give each row the same bits whatever the other rows hold.
    So a sequence's logits do not change with how many others are running (tests/test_serve_engine.py
    holds them to 1e-5; the difference measured is 0).

    `gpt2lab sample` decodes its one row from weights packed for one row, so against it the logits
    agree to float32 rounding only (at most 4e-6 at GPT-2 124M's shape, measured), and greedy tokens
    are the same except where the two most likely tokens' logits are that close (same test file).
    """
    assert not model.training, "decode_step is for inference; call model.eval()"
    cfg = model.config
    device = model.device
    rows = len(tokens)
    if rows == 1:
        slots, positions, tokens = [slots[0]] * 2, [positions[0]] * 2, [tokens[0]] * 2
    B, C, nh = len(tokens), cfg.n_embd, cfg.n_head
    hs = C // nh
    slot_t = torch.tensor(list(slots), dtype=torch.long, device=device)  # (B,)
    pos_t = torch.tensor(list(positions), dtype=torch.long, device=device)  # (B,)
    idx = torch.tensor(list(tokens), dtype=torch.long, device=device)  # (B,)
    tr = model.transformer
    x = (tr.wte(idx) + tr.wpe(pos_t)).unsqueeze(1)  # (B, 1, C)
    for layer, block in enumerate(tr.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)  # 3 x (B, 1, C)
        q = q.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = k.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        v = v.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
        pool.k[layer][slot_t, :, pos_t] = k[:, :, 0]  # (B, nh, hs) into (S, nh, L, hs)
        pool.v[layer][slot_t, :, pos_t] = v[:, :, 0]
        ys = []
        for b in range(rows):  # each row over its own length: (1, nh, 1, hs) against (1, nh, pos + 1, hs)
            s, end = slots[b], positions[b] + 1
            ys.append(
                F.scaled_dot_product_attention(
                    q[b : b + 1], pool.k[layer, s : s + 1, :, :end], pool.v[layer, s : s + 1, :, :end]
                )
            )
        if rows < B:
            ys.append(ys[0])
        y = torch.cat(ys).transpose(1, 2).contiguous().view(B, 1, C)  # (B, 1, C)
        x = x + attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(tr.ln_f(x))[:, 0, : cfg.vocab_size]  # (B, V)
    return logits[:rows]
