"""The log-likelihood of continuations after their contexts, the question multiple-choice scoring asks:
lm-evaluation-harness's `loglikelihood` (lm_eval.py) and HellaSwag (hellaswag.py) both ask it here.

`score_requests` answers, for each (context tokens, continuation tokens), the summed log-probability of
the continuation and whether every one of its tokens is the model's greedy choice. A request is cut as
the harness's `hf` model cuts it (`cut_request`): the last block_size + 1 tokens of context and
continuation, less the last one. On a CPU, requests that share a context (the choices of an item) share
a row: the context once, then each request's tokens at the positions after it, seeing the context and
themselves only (`SharedPrefixRows`, given to the model in its KV cache's place). Only the scored
positions go through the output projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import GPT2LabError
from ..model import GPT
from ..runtime import autocast
from .common import evaluating, hidden_at, nll_chunk_rows, token_losses


def cut_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """The model's input for one request, as the `hf` model cuts it: (prefix, tail). The last
    max_length + 1 tokens of context + continuation, less the last one, are the input; its last
    len(continuation) positions predict the continuation. `tail` is those positions' tokens, `prefix`
    the ones before (what requests with the same context share)."""
    n = len(continuation)
    if n == 0:
        raise GPT2LabError("the likelihood of an empty continuation was asked for")
    if n > max_length:
        raise GPT2LabError(f"a continuation of {n} tokens does not fit the model's context of {max_length}")
    inp = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    return inp[: len(inp) - n], inp[len(inp) - n :]


def _answers(gpt: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and whether it is the argmax, from (N, C) hidden states: (N,) float64
    and (N,) bool. The logits are made a chunk of positions at a time, as common.token_nll makes them, and
    each log-probability is minus common.token_losses' cross-entropy."""
    chunk = nll_chunk_rows(hidden.device)
    logp = torch.empty(hidden.size(0), dtype=torch.float64, device=hidden.device)
    greedy = torch.empty(hidden.size(0), dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        end = min(start + chunk, hidden.size(0))
        logits = gpt.head(hidden[start:end]).float()  # (c, V)
        t = targets[start:end]
        logp[start:end] = -token_losses(logits, t).double()
        greedy[start:end] = logits.max(dim=-1).indices == t  # the first of equal maxima, as argmax, in less time
    return logp, greedy


def _per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=dtype, device=values.device).index_add_(0, rows, values.to(dtype))


Cut = tuple[list[int], list[int], list[int]]  # (prefix, tokens fed after it, continuation)
Row = tuple[list[int], list[int]]  # (a prefix, the requests whose fed tokens follow it in one row)


class SharedPrefixRows:
    """Rows laid out as [prefix, fed tokens of request 1, of request 2, ...], given to GPT.hidden_states
    in the place of its KV cache: it answers the cache's three questions (`positions`, `update`,
    `advance`) and keeps nothing. Each request's tokens sit at the positions right after the prefix and
    attend to the prefix and to themselves only, so each request is scored as if it were alone after
    the prefix, and the prefix runs once for all of them.

    pos: (B, T) each token's position; mask: (B, 1, T, T), True where a query may see a key."""

    def __init__(self, pos: torch.Tensor, mask: torch.Tensor) -> None:
        self.pos, self.mask = pos, mask

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.pos  # (B, T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return k, v, self.mask  # this pass's own keys and values (B, nh, T, hs) are all there are

    def advance(self, T: int) -> None:
        pass


def pack_rows(cut: Sequence[Cut], share: bool, block: int) -> list[Row]:
    """The rows to feed. With `share`, requests with the same prefix follow one copy of it, as many as
    fit the model's context of `block` tokens in a row (the rest start another row); requests with no
    prefix (a one-token context) share rows the same way, each from position 0. Without, a row per
    request."""
    groups: dict[Any, list[int]] = {}
    for i, (prefix, _, _) in enumerate(cut):
        groups.setdefault(tuple(prefix) if share else i, []).append(i)
    rows: list[Row] = []
    for members in groups.values():
        prefix, length = cut[members[0]][0], block
        for i in members:
            if length + len(cut[i][1]) > block:
                rows.append((prefix, []))
                length = len(prefix)
            rows[-1][1].append(i)
            length += len(cut[i][1])
    return rows


def _score_rows(gpt: GPT, cut: Sequence[Cut], rows: Sequence[Row]) -> list[tuple[float, bool]]:
    """One forward pass over `rows`, right-padded: the answers of their requests, in row order. The
    last len(continuation) of each request's fed tokens predict its continuation."""
    width = max(len(prefix) + sum(len(cut[i][1]) for i in members) for prefix, members in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    pos = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    # Which part of its row each token is: 0 the prefix, k the row's k-th request. The padding at a
    # row's end is 0 too; no token before it sees it.
    part = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    r_list, c_list, slots, targets = [], [], [], []
    n = 0  # requests so far
    for b, (prefix, members) in enumerate(rows):
        idx[b, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        pos[b, : len(prefix)] = torch.arange(len(prefix))
        col = len(prefix)
        for k, i in enumerate(members, 1):
            _, feed, cont = cut[i]
            end = col + len(feed)
            idx[b, col:end] = torch.tensor(feed)
            pos[b, col:end] = torch.arange(len(prefix), len(prefix) + len(feed))
            part[b, col:end] = k
            r_list += [b] * len(cont)
            c_list += range(end - len(cont), end)
            slots += [n] * len(cont)
            targets += cont
            n, col = n + 1, end
    device = gpt.device
    r, c, s, tgt = (torch.tensor(v, dtype=torch.long, device=device) for v in (r_list, c_list, slots, targets))
    layout = None  # a request alone in each row: plain causal attention from position 0
    if any(len(members) > 1 for _, members in rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T): query t sees keys 0 .. t
        seen = (part.unsqueeze(1) == 0) | (part.unsqueeze(1) == part.unsqueeze(2))  # (B, T, T): prefix or own part
        layout = SharedPrefixRows(pos.to(device), (causal & seen).unsqueeze(1).to(device))
    logp, greedy = _answers(gpt, hidden_at(gpt, idx.to(device), r, c, cache=layout), tgt)
    sums = _per_row(logp, s, n, torch.float64).tolist()
    misses = _per_row(~greedy, s, n, torch.int64).tolist()
    return [(total, missed == 0) for total, missed in zip(sums, misses)]


def score_requests(
    gpt: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    share_context: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether every continuation token is the greedy one)
    for each (context tokens, continuation tokens), in the order given.

    share_context (default: on a CPU): requests whose inputs share everything before the scored
    positions go in one row, that prefix once and each request's tokens after it (SharedPrefixRows);
    otherwise each request is a row of its own. `batch_size` rows per forward pass, longest first, so
    that similar lengths are padded together.
    """
    device = gpt.device
    share = device.type == "cpu" if share_context is None else share_context
    block = gpt.config.block_size
    cut = [(*cut_request(ctx, cont, block), list(cont)) for ctx, cont in requests]
    rows = sorted(pack_rows(cut, share, block), key=lambda row: -(len(row[0]) + sum(len(cut[i][1]) for i in row[1])))
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(cut)
    from tqdm.auto import tqdm

    with evaluating(gpt), tqdm(total=len(cut), desc=desc, unit="request", disable=not progress, leave=False) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            order = [i for _, members in batch for i in members]
            with autocast(device, autocast_dtype):
                for i, answer in zip(order, _score_rows(gpt, cut, batch)):
                    answers[i] = answer
            bar.update(len(order))
    return answers
