"""GPT-2, top to bottom.

OpenAI's GPT-2 as released (gpt-2/src/model.py) and as Hugging Face implements it
(transformers/models/gpt2/modeling_gpt2.py): learned token and position embeddings, pre-LayerNorm
blocks, causal self-attention, a 4x MLP with tanh-approximated GELU, a final LayerNorm, and an output
projection tied to the token embedding. Parameter names are GPT-2's own (`wte`, `wpe`, `h`, `ln_1`,
`c_attn`, ...), so the Hugging Face bridge only has to transpose the Conv1D weights.

Shapes: B batch, T sequence length, C = n_embd, nh = n_head, hs = C // nh, V = vocab size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled at init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        mask = None
        if cache is not None:
            # Every key so far: (B, nh, S, hs). The mask says which of them each query may see, or is
            # None where plain causal attention from position 0 (or, for T == 1, every key) is right.
            k, v, mask = cache.update(layer, k, v)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu is the tanh approximation (HF's "gelu_new")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        # Weight tying (GPT-2, and Press & Wolf 2017): the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size :].zero_()  # padding rows are never used

    def _init_weights(self, module: nn.Module) -> None:
        # N(0, 0.02) everywhere, zero biases, and the two projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, include_padding: bool = False) -> int:
        """Parameter count, tied weights once; padding rows of the vocabulary left out by default."""
        n = sum(p.numel() for p in self.parameters())
        if not include_padding:
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    @classmethod
    def from_state_dict(
        cls,
        config: GPTConfig,
        state_dict: dict[str, torch.Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> GPT:
        """Build a model straight from weights, skipping the random initialisation."""
        with torch.device("meta"):
            model = cls(config)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
        sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
        model.load_state_dict(sd, strict=True, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # assign=True unties: tie again
        return model

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states (after ln_f), without the output projection: (B, T, C).

        idx: (B, T) token ids. With a `cache`, the T tokens of each row follow that row's cached ones,
        and the cache keeps their keys and values.
        """
        B, T = idx.size()
        if cache is not None:
            pos = cache.positions(T, idx.device)  # (B, T), or (T,) when all rows are at one position
        elif self.config.block_size >= T:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context ({self.config.block_size})")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states: (..., C) -> (..., V), the vocabulary's padding rows left out."""
        logits = self.lm_head(x)  # (..., padded V)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding never enters a softmax
        return logits

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position, and the mean cross-entropy against `targets` (B, T)
        (-1 where no loss is wanted), or None without targets. `cache` as in `hidden_states`."""
        logits = self.head(self.hidden_states(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper appendix B:
        6 * N (non-embedding matmul params + lm_head) + 12 * n_layer * n_embd * T for attention."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        n = self.num_params(include_padding=True) - self.transformer.wpe.weight.numel()
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * T


class KVCache:
    """Keys and values of every layer for `batch_size` rows, so that each forward pass after the first
    feeds only the new tokens. Each row has its own length: `generate` keeps its rows together, while
    the server's rows join and leave at their own positions (`select`, `reset`, `copy_row`).

    `k`, `v`: (n_layer, batch_size, nh, max_len, hs), zeroed; `pos[r]`: positions of row r filled.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = config.block_size if max_len is None else max_len
        if max_len > config.block_size:
            raise ValueError(f"KVCache max_len {max_len} exceeds the model's block_size {config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = [0] * batch_size
        self.rows: list[int] | None = None  # the rows a forward pass feeds, in batch order; None: all
        self._plan: tuple = ()  # where this forward pass writes and reads, set by `positions`

    def select(self, rows: Sequence[int]) -> KVCache:
        """The same cache (same tensors and positions) fed only the rows `rows`. A row named twice is
        fed the same token twice and advances once."""
        view = copy.copy(self)
        view.rows = list(rows)
        return view

    def reset(self, rows: Sequence[int] | None = None) -> None:
        for r in range(len(self.pos)) if rows is None else rows:
            self.pos[r] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Give row `dst` the filled positions of row `src` (sequences that share a prompt)."""
        n = self.pos[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.pos[dst] = n

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions of the T new tokens of each row: (T,) when the rows are side by side at one
        position (written and read as slices), else (B, T) (written and read by index)."""
        rows = list(range(len(self.pos))) if self.rows is None else self.rows
        starts = [self.pos[r] for r in rows]
        end = max(starts) + T
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens is longer than the KV cache ({self.max_len})")
        if len(set(starts)) == 1 and rows == list(range(rows[0], rows[0] + len(rows))):
            p = starts[0]
            mask = None  # causal from position 0, or one query that sees every key
            if p > 0 and T > 1:  # query i sits at position p + i and sees keys 0 .. p + i
                mask = torch.arange(end, device=device) <= torch.arange(p, end, device=device).unsqueeze(1)  # (T, S)
            self._plan = (slice(rows[0], rows[0] + len(rows)), p, mask, end)
            return torch.arange(p, end, dtype=torch.long, device=device)  # (T,)
        pos = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(T, device=device)  # (B, T)
        mask = (torch.arange(end, device=device) <= pos.unsqueeze(2)).unsqueeze(1)  # (B, 1, T, S)
        self._plan = (torch.tensor(rows, device=device), pos, mask, end)
        return pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new keys and values (B, nh, T, hs); return all of these rows' keys and values
        (B, nh, S, hs) and the attention mask, (T, S) or (B, 1, T, S) or None (see `positions`)."""
        rows, start, mask, end = self._plan
        if isinstance(rows, slice):
            self.k[layer, rows, :, start : start + k.size(2)] = k
            self.v[layer, rows, :, start : start + k.size(2)] = v
        else:  # start: (B, T) positions; the (row, position) pairs index (B, T, nh, hs)
            self.k[layer][rows.unsqueeze(1), :, start] = k.transpose(1, 2)
            self.v[layer][rows.unsqueeze(1), :, start] = v.transpose(1, 2)
        return self.k[layer, rows, :, :end], self.v[layer, rows, :, :end], mask

    def advance(self, T: int) -> None:
        for r in set(range(len(self.pos)) if self.rows is None else self.rows):
            self.pos[r] += T
        self._plan = ()


def count_parameters(config: GPTConfig) -> int:
    """Unpadded parameter count of a config, without building the model."""
    C, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + P * C + L * per_layer + 2 * C


def unwrap(model: nn.Module) -> GPT:
    """The plain GPT inside a DistributedDataParallel and/or torch.compile wrapper (or `model` itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
