"""The server's model calls over its one KV cache (model.KVCache): each running sequence owns a row
("slot") of a cache as long as the model's context, and every decode step feeds one token to each
running sequence, each at its own position, through the model's own forward pass. Decoding one token
is bound by reading the weights, so a batch of rows that shares one read is where batching pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import GPT, KVCache


def new_pool(model: GPT, slots: int) -> KVCache:
    """A cache of `slots` rows, allocated once so the server's memory does not grow with the traffic."""
    return KVCache(model.config, slots, device=model.device, dtype=model.lm_head.weight.dtype)


@torch.inference_mode()
def prefill(model: GPT, pool: KVCache, slot: int, prompt: Sequence[int]) -> torch.Tensor:
    """Run the prompt through the model into row `slot`; returns the next-token logits (1, V). One row,
    the whole prompt, from position 0: the call `generate` makes, so the first token of a request is
    computed exactly as `gpt2lab sample` computes it."""
    pool.reset([slot])
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)  # (1, T)
    return model.head(model.hidden_states(idx, pool.select([slot]))[:, -1])  # (1, V)


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
def decode_step(model: GPT, pool: KVCache, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Feed `tokens[b]` to the sequence in row `slots[b]` of the pool, after its cached positions;
    returns the next-token logits of each, (B, V).

    A lone row is decoded as two identical rows: matrix kernels may pick their summation order by the
    number of rows, and from two rows on they give each row the same bits whatever the others hold. So a
    sequence's logits do not depend on how many others are running (tests/test_serve_engine.py).
    """
    assert not model.training, "decode_step is for inference; call model.eval()"
    rows = len(tokens)
    if rows == 1:
        slots, tokens = [slots[0]] * 2, [tokens[0]] * 2
    idx = torch.tensor(list(tokens), dtype=torch.long, device=model.device).unsqueeze(1)  # (B, 1)
    logits = model.head(model.hidden_states(idx, pool.select(slots))[:, -1])  # (B, V)
    return logits[:rows]
