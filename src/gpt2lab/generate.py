"""Text generation: prefill once, then decode one token at a time from a preallocated KV cache.

Context longer than the model's window (`block_size`) is handled by cropping and sliding:
a prompt longer than the window keeps only its last `block_size` tokens, and when the cache is full the
window slides: the oldest half is dropped and the newest `block_size // 2` tokens are prefilled again
(GPT-2's positions are absolute, so cached keys cannot simply be shifted). Every token is therefore
predicted from between `block_size // 2` and `block_size` tokens of context. The uncached path
(`use_cache=False`) follows exactly the same windows, recomputing the whole window at every step.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import accel
from .model import GPT, KVCache
from .tokenizer import Tokenizer


def filter_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); the rest become -inf. Ties at the k-th value stay."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p (always at least one token); the rest become -inf. (B, V) -> (B, V)."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= p  # the first token always has mass_before = 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen, and when a sample ends; passed as `sampling=` to every
    generation function.

    temperature: 0 is greedy (argmax); top_k: keep the k most likely tokens (None or 0 = off);
    top_p: nucleus mass in (0, 1] (None or 1 = off); seed: a private generator's seed (None = torch's
    global RNG); stop_token: a sample ends at (and keeps) its first occurrence, None = never.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row from (B, V) logits; temperature 0 is greedy (argmax). Returns (B,) int64."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    logits = filter_top_p(filter_top_k(logits, sampling.top_k), sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0  # per sample
    num_samples: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    slides: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all samples) per second of prefill + decode."""
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens * self.num_samples / total if total > 0 else 0.0


@dataclass
class Generation:
    """Per-sample new tokens (without the prompt), each ending at its stop token when it met one."""

    tokens: list[list[int]]
    stats: GenerationStats = field(default_factory=GenerationStats)


def generate_tokens(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingParams = SamplingParams(),
    num_samples: int = 1,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    new_document: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, (num_samples,) int64 on the model's device, step by step.

    All samples share the prompt and are decoded as one batch; an empty prompt starts a new document
    (<|endoftext|>), as `gpt2lab sample` and the server do: `new_document` is its id, by default the
    vocabulary's last (<|endoftext|> in every text vocabulary; a chat model's tokenizer has four chat
    tokens after it, so pass `tokenizer.eot_token`). With `sampling.stop_token` set, decoding
    ends once every sample has produced it (samples that ended earlier keep being decoded meanwhile);
    any other stopping is the caller's choice: break out of the loop.
    """
    accel.pack_for_inference(model, num_samples)  # on a CPU, where packed weights decode faster
    if len(prompt) == 0:  # a new document, as the CLI and the server start one
        prompt = [model.config.vocab_size - 1 if new_document is None else new_document]
    yield from _decode(model, prompt, max_new_tokens, sampling, num_samples, use_cache, stats)


@torch.inference_mode()
def _decode(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    num_samples: int,
    use_cache: bool,
    stats: GenerationStats | None,
) -> Iterator[torch.Tensor]:
    if max_new_tokens < 0 or num_samples < 1:
        raise ValueError("max_new_tokens must be >= 0 and num_samples >= 1")
    device = model.device
    block = model.config.block_size
    keep = max(1, block // 2)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed)
    stats = stats if stats is not None else GenerationStats()
    stats.num_samples = num_samples
    prompt_t = torch.tensor(list(prompt)[-block:], dtype=torch.long, device=device)
    seq = prompt_t.unsqueeze(0).expand(num_samples, -1).clone()  # (S, L): every token so far
    stats.prompt_tokens = len(prompt)
    start = 0  # the model's window is seq[:, start:]
    cache = None
    if use_cache:
        # As long as the sequence can get: the whole context only where the window will have to slide.
        max_len = min(block, len(prompt) + max_new_tokens)
        cache = KVCache(model.config, num_samples, max_len, device=device, dtype=model.lm_head.weight.dtype)
    stopped = None
    if sampling.stop_token is not None:
        stopped = torch.zeros(num_samples, dtype=torch.bool, device=device)  # (S,)

    def window_logits(new_start: int) -> torch.Tensor:
        if cache is not None:
            cache.reset()
        return model.head(model.hidden_states(seq[:, new_start:], cache)[:, -1])  # (S, V)

    t0 = time.perf_counter()
    logits = window_logits(start)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample_next(logits, sampling, generator)  # (S,)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        stats.new_tokens = step + 1
        stats.decode_seconds = time.perf_counter() - t0
        yield nxt
        if step + 1 == max_new_tokens:
            break
        if stopped is not None:
            stopped |= nxt == sampling.stop_token
            if bool(stopped.all()):
                break
        if seq.size(1) - start > block:  # the window is full: slide it
            start = seq.size(1) - keep
            stats.slides += 1
            logits = window_logits(start)
        elif cache is not None:
            logits = model.head(model.hidden_states(nxt.unsqueeze(1), cache)[:, -1])  # (S, V)
        else:
            logits = window_logits(start)
    stats.decode_seconds = time.perf_counter() - t0


def generate(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingParams = SamplingParams(),
    num_samples: int = 1,
    use_cache: bool = True,
    new_document: int | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` per sample. With `sampling.stop_token` set, a sample ends at
    (and keeps) its first stop token, and decoding stops once every sample has ended. An empty prompt
    starts with `new_document` (see `generate_tokens`)."""
    stats = GenerationStats()
    outs: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    stop = sampling.stop_token
    for nxt in generate_tokens(
        model,
        prompt,
        max_new_tokens,
        sampling=sampling,
        num_samples=num_samples,
        use_cache=use_cache,
        stats=stats,
        new_document=new_document,
    ):
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                outs[i].append(t)
                done[i] = stop is not None and t == stop
    return Generation(outs, stats)


class TextStreamer:
    """Turns tokens into text pieces that always end on a whole UTF-8 character.

    A character split across tokens (emoji, CJK, combining sequences of bytes) is held back until its
    last byte arrives; bytes that can never form valid UTF-8 come out as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingParams = SamplingParams(),
    stats: GenerationStats | None = None,
    end_tokens: Collection[int] = (),
) -> Iterator[str]:
    """Yield the continuation of one prompt as text, piece by piece, each piece ending on a whole
    UTF-8 character (see TextStreamer). The text ends at the stop token, if `sampling` names one, or at
    any of `end_tokens` (a chat turn's end), none of which is printed."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    ids = ids or [tokenizer.eot_token]  # an empty prompt starts a new document
    streamer = TextStreamer(tokenizer)
    for nxt in generate_tokens(model, ids, max_new_tokens, sampling=sampling, stats=stats):
        token = int(nxt[0])
        if token == sampling.stop_token or token in end_tokens:
            break
        piece = streamer.push(token)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail
