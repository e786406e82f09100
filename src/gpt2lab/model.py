"""GPT-2, top to bottom.

The architecture is OpenAI's GPT-2 as released (gpt-2/src/model.py) and as Hugging Face implements it
(transformers/models/gpt2/modeling_gpt2.py): learned token and position embeddings, pre-LayerNorm
blocks, causal self-attention, a 4x MLP with tanh-approximated GELU, a final LayerNorm and an output
projection tied to the token embedding. Parameter names are GPT-2's own (`wte`, `wpe`, `h`, `ln_1`,
`c_attn`, ...), so the Hugging Face bridge only has to transpose the Conv1D weights.

Shapes: B batch, T sequence length, C = n_embd, nh = n_head, hs = C // nh, V = vocab size.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .losses import CpuLossKernel, linear_cross_entropy
from .tuning import packing_pays


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    `k` and `v` have shape (n_layer, B, nh, max_len, hs). `pos` counts the positions already filled;
    a forward pass with the cache writes its T new positions at [pos, pos + T) in every layer and then
    advances `pos` by T.
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
        # Not zeroed: only the filled positions [0, pos) are ever read, and zeroing GPT-2's whole
        # 1024-position cache (75 MB) took longer than decoding a few tokens on a CPU.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys/values at the current position; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, pos + T, hs)


class Linear(nn.Linear):
    """nn.Linear that can also run from a oneDNN-packed copy of its weight, for CPU inference.

    Decoding multiplies a few rows by every weight of the model for each new token, so it is bound by
    reading the weights. oneDNN's blocked weight layout streams them at close to the machine's memory
    bandwidth, about 2.5x faster than MKL on nn.Linear's (out, in) matrix on a 2-core AMD EPYC (but
    15% slower on an Intel Xeon, where GPT.pack_for_cpu_inference leaves the weights plain; see
    bench/generate.py); torch.compile's CPU "freezing" mode packs weights the same way. The pack is
    a copy: it is used only without autograd, while the weight is unchanged since it was packed.

    The pack is CPU eager-mode state, invisible to torch.compile: compiled code never reads it, and
    `unpack` deletes the instance attributes again instead of overwriting them with None, so a module
    that was packed and unpacked has the same attribute dict as one never packed. Otherwise an
    instance attribute would shadow the class default and fail dynamo's guards on the compiled
    training graph, recompiling it after every evaluation that samples text.
    """

    packed: torch.Tensor | None = None  # class defaults; only a packed module has instance values
    _packed_for: tuple[int, int] = (-1, -1)  # (data_ptr, version) of the weight that was packed

    def pack(self, batch_size: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_size)
        self._packed_for = (self.weight.data_ptr(), self.weight._version)

    def unpack(self) -> None:
        for name in ("packed", "_packed_for"):
            self.__dict__.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # not traced, so no guard on packing state (see above)
            return F.linear(x, self.weight, self.bias)
        p = self.packed
        if (
            p is not None
            and not torch.is_grad_enabled()
            and x.dtype == p.dtype
            and x.device.type == "cpu"
            and (self.weight.data_ptr(), self.weight._version) == self._packed_for
        ):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), p, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # query, key, value for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd)
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
        if cache is None or cache.pos == 0:
            if cache is not None:
                cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
            if T == 1:  # one new query attends to every cached position: no mask needed
                mask = None
            else:  # query i sits at absolute position past + i and sees keys 0 .. past + i
                rows = torch.arange(T, device=x.device).unsqueeze(1) + past
                mask = torch.arange(past + T, device=x.device).unsqueeze(0) <= rows  # (T, past + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2's gelu is the tanh approximation (HF's "gelu_new").
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
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
        self._packed_batch: int | None = None  # see pack_for_cpu_inference
        self._plain_batch: int | None = None  # the batch size packing was measured not to pay for
        # The float32 CPU loss's chunk and exponential (losses.CpuLossKernel); the trainer sets it.
        self.loss_kernel: CpuLossKernel | None = None
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
        self.lm_head = Linear(config.n_embd, V, bias=False)
        # Weight tying (GPT-2, and Press & Wolf 2017): the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        with torch.no_grad():
            self.transformer.wte.weight[config.vocab_size :].zero_()  # padding rows are never used

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02) everywhere, and the two projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3), zero biases.
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

    def pack_for_cpu_inference(self, batch_size: int | None) -> bool:
        """Give every Linear a oneDNN-packed copy of its weight tuned for `batch_size` rows (see
        Linear), or drop the copies with None. Returns whether packed weights are in use.

        Costs one extra copy of the weights in memory while packed; `train()` drops them. Packing is
        skipped where oneDNN is not available, for dtypes other than float32 / bfloat16, and off CPU;
        there, a model that was never packed is left untouched (a compiled training graph guards on it).
        It is also skipped where it does not pay: on an Intel Xeon, MKL's products with the plain
        weights decoded GPT-2 faster than oneDNN's packed ones, on an AMD EPYC 2.5x slower. For a model
        of 64 MB of weights or more the first call times both once (time_decode_step) and the choice is
        kept in gpt2lab's cache (tuning.packing_pays); smaller models are packed untimed.
        """
        usable = (
            batch_size is not None
            and self.device.type == "cpu"
            and self.lm_head.weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
        )
        if not usable and self._packed_batch is None:
            return False
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        if not usable:
            for m in linears:
                m.unpack()
            self._packed_batch = None
            return False
        if self._plain_batch == batch_size:  # measured: the plain weights decode faster on this machine
            return self._keep_plain(linears, batch_size)
        stale = any(m.packed is None or (m.weight.data_ptr(), m.weight._version) != m._packed_for for m in linears)
        if stale or batch_size != self._packed_batch:
            # Only when (re)packing: the machine's answer, from gpt2lab's cache or else timed once packed.
            shape = self._decode_shape()
            weight_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
            if packing_pays(shape, weight_bytes, batch_size, None) is False:
                return self._keep_plain(linears, batch_size)
            try:
                for m in linears:
                    m.pack(batch_size)
            except RuntimeError:  # a build of torch without these oneDNN kernels
                for m in linears:
                    m.unpack()
                self._packed_batch = None
                return False
            self._packed_batch = batch_size
            if not packing_pays(shape, weight_bytes, batch_size, lambda: self.time_decode_step(batch_size)):
                return self._keep_plain(linears, batch_size)
        return True

    def _keep_plain(self, linears: list[Linear], batch_size: int) -> bool:
        for m in linears:
            m.unpack()
        self._packed_batch, self._plain_batch = None, batch_size
        return False

    def _decode_shape(self) -> str:
        c = self.config
        dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        return f"{dtype} | {c.n_layer} layers x {c.n_embd} wide, vocab {c.padded_vocab_size}"

    @torch.inference_mode()
    def time_decode_step(self, batch_size: int, rounds: int = 3, context: int = 32) -> dict[str, float]:
        """Fastest seconds of one decoding step (a token per row after `context` cached ones) with the
        packed weights and with the plain ones, taking turns. The model must be packed."""
        ctx = min(context, self.config.block_size - 1)
        cache = KVCache(self.config, batch_size, ctx + 1, device=self.device, dtype=self.lm_head.weight.dtype)
        idx = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self(torch.zeros(batch_size, ctx, dtype=torch.long, device=self.device), cache=cache, last_only=True)
        best = {"packed": float("inf"), "plain": float("inf")}
        for _ in range(rounds):
            for way in best:
                with self.packs_set_aside() if way == "plain" else contextlib.nullcontext():
                    cache.pos = ctx
                    t0 = time.perf_counter()
                    self(idx, cache=cache, last_only=True)
                    best[way] = min(best[way], time.perf_counter() - t0)
        return best

    @contextlib.contextmanager
    def packs_set_aside(self) -> Iterator[None]:
        """The plain weights for a while, the packed copies kept aside (to time one against the other)."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and "packed" in m.__dict__]
        saved = [m.__dict__.pop("packed") for m in linears]
        try:
            yield
        finally:
            for m, packed in zip(linears, saved):
                m.packed = packed

    def train(self, mode: bool = True) -> GPT:
        if mode and self._packed_batch is not None:
            self.pack_for_cpu_inference(None)
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy when `targets` are given.

        idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss is wanted.
        cache: a KVCache; the T tokens are placed after the `cache.pos` cached ones, which it extends.
        last_only: compute logits for the final position only (for generation): (B, 1, V).
        return_logits: with False (training), only the loss is computed, fused with the output
        projection in chunks (gpt2lab/losses.py), and the logits returned are None.
        Returns logits (B, T, V) with V = config.vocab_size, and the loss (a scalar) or None.
        """
        B, T = idx.size()
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context ({self.config.block_size})"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits and not torch.compiler.is_compiling():
            # No (B, T, V) logits tensor; under torch.compile the plain path below is fused by Inductor.
            C = x.size(-1)
            return None, linear_cross_entropy(
                x.reshape(-1, C),
                self.lm_head.weight,
                targets.reshape(-1),
                self.config.vocab_size,
                kernel=self.loss_kernel,
            )
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, padded V)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, V): padding never enters a softmax
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits if return_logits else None), loss

    @torch.no_grad()
    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper appendix B:
        6 * N (non-embedding matmul params + lm_head) + 12 * n_layer * n_embd * T for attention."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        n = self.num_params(include_padding=True) - self.transformer.wpe.weight.numel()
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * T


def count_parameters(config: GPTConfig) -> int:
    """Unpadded parameter count of a config, without building the model."""
    C, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + P * C + L * per_layer + 2 * C


def unwrap(model: nn.Module) -> GPT:
    """The plain GPT inside a DistributedDataParallel and/or torch.compile wrapper (or `model` itself):
    the module whose parameters, state_dict names and forward hooks are the model's own."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
