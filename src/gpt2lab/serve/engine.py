"""The scheduler: every model's running sequences decoded together, one step at a time, on one thread.

A request becomes one `Group` per prompt (its `n` choices share the prompt). Groups wait in a bounded
queue; between two decode steps the engine drops the sequences whose client went away, admits waiting
groups into free rows (slots) of the model's KV cache (prefilling each prompt alone, exactly as `generate`
does), then runs one `decode_step` over all of that model's running sequences. A sequence leaves as
soon as it ends, so a short request never waits for a long one.

Each choice draws from its own `torch.Generator`, seeded from the request (or at random), through the
same `sample_next` that `gpt2lab sample` uses; what other requests do never touches its random stream.

Results go back as `Event`s through a callback that the HTTP layer hands over with each group; it is
called on the engine thread and must not block. If it raises (its client's event loop has closed, at
shutdown), the engine drops that group and keeps serving the others.

Text and logprobs agree: a token is reported (in `logprobs`) with the event that releases the first
character of its text, so tokens whose text is held back (it may still become a stop string) wait with
it, and tokens cut off with a stop string, or `<|endoftext|>` itself (or a chat reply's end token), are
never reported, as their text never is. Each token's `offset` is where its text starts in the choice's text.
"""

from __future__ import annotations

import bisect
import collections
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import accel
from ..generate import SamplingParams, sample_next
from ..model import GPT
from ..tokenizer import Tokenizer
from .batch import decode_step, new_pool, prefill, prompt_logprobs
from .text import StopMatcher, TokenText, token_text


class QueueFull(Exception):
    """The waiting queue cannot take the request; the client should retry later."""


@dataclass
class TokenInfo:
    """One token as the `logprobs` field reports it: its text, its log-probability, the top N, and where
    its text starts (characters from the start of the completion, or of the prompt for echoed tokens)."""

    token: int
    text: str
    logprob: float | None
    top: list[tuple[str, float]] | None
    offset: int = 0
    top_ids: list[int] | None = None  # the ids of `top`'s tokens (chat logprobs report their bytes)


@dataclass
class Event:
    """What one choice produced since its last event: text released to the client (possibly empty),
    the tokens behind it, and on the last event the finish reason ("stop" or "length") or an error.
    The first event of a choice that echoes its prompt with logprobs carries the prompt's tokens in `echo`."""

    choice: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    echo: list[TokenInfo] = field(default_factory=list)


@dataclass
class Group:
    """One prompt of a request and its `n` choices, numbered from `first_choice`."""

    model: str
    prompt: list[int]
    n: int
    first_choice: int
    max_tokens: int  # 0: only score the prompt (echo with logprobs), no slot needed
    sampling: SamplingParams  # seed is the first choice's; choice j draws from seed + j
    stop: list[str]
    logprobs: int | None  # top-N alternatives to report per token; None = no logprobs
    echo_logprobs: bool  # also report the prompt tokens' log-probabilities
    emit: Callable[[Event], None]
    cancelled: bool = False
    end_ids: frozenset[int] = frozenset()  # tokens that end a choice as <|endoftext|> does (a chat turn's end)


@dataclass
class _Running:
    group: Group
    choice: int
    slot: int
    last: int  # the token to feed next
    generator: torch.Generator
    text: TokenText
    matcher: StopMatcher
    generated: int = 0
    released: int = 0  # characters of text sent to the client
    held: list[TokenInfo] = field(default_factory=list)  # tokens whose text is not sent yet


class ModelRunner:
    """One model, its tokenizer, its slot pool, and the sequences it is decoding."""

    def __init__(self, name: str, model: GPT, tokenizer: Tokenizer, max_batch: int) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.context = model.config.block_size
        accel.pack_for_inference(model, max_batch)  # on a CPU, the weights' fastest layout here (gpt2lab/accel)
        self.pool = new_pool(model, max_batch)
        self.free = list(range(max_batch - 1, -1, -1))
        self.waiting: collections.deque[Group] = collections.deque()
        self.running: list[_Running] = []

    # -- one scheduling round ------------------------------------------------------------------------

    def drop_cancelled(self) -> None:
        """Free the slots of cancelled sequences; the caller holds the engine's lock (for `waiting`)."""
        for r in [r for r in self.running if r.group.cancelled]:
            self._release(r)
        self.waiting = collections.deque(g for g in self.waiting if not g.cancelled)

    def admit(self, prefill_budget: int, lock: threading.Condition) -> None:
        """Prefill waiting groups into free slots, first come first served, until `prefill_budget` prompt
        tokens were prefilled this round (always at least one group when slots are free). `lock` guards
        `waiting`, which requests join from other threads; it is not held while prefilling."""
        spent = 0
        while True:
            with lock:
                if not self.waiting or len(self.free) < self._slots_needed(self.waiting[0]):
                    return
                group = self.waiting[0]
                if spent and spent + len(group.prompt) > prefill_budget:
                    return
                self.waiting.popleft()
            spent += len(group.prompt)
            self._start(group)

    def step(self) -> None:
        if not self.running:
            return
        batch = list(self.running)
        logits = decode_step(self.model, self.pool, [r.slot for r in batch], [r.last for r in batch])
        for r, row in zip(batch, logits):
            self._advance(r, row.unsqueeze(0))

    # -- sequences -----------------------------------------------------------------------------------

    @staticmethod
    def _slots_needed(group: Group) -> int:
        return group.n if group.max_tokens > 0 else 0

    def _start(self, group: Group) -> None:
        """Prefill the group's prompt and choose each choice's first token. If that fails, the group's
        slots go back to the pool and its choices end with an error; the other sequences carry on."""
        slots = [self.free.pop() for _ in range(self._slots_needed(group))]
        try:
            self._start_in(group, slots)
        except Exception as e:  # a bug or out of memory in this prompt: fail it alone
            self.running = [r for r in self.running if r.group is not group]
            self.free.extend(s for s in slots if s not in self.free)
            message = f"internal error while prefilling the prompt: {type(e).__name__}: {e}"
            for j in range(group.n):
                self._emit(group, Event(group.first_choice + j, error=message))
            group.cancelled = True

    def _start_in(self, group: Group, slots: list[int]) -> None:
        echo = self._prompt_info(group) if group.echo_logprobs else []
        if group.max_tokens == 0:  # prompt scoring: the echoed prompt is the whole answer
            for j in range(group.n):
                self._emit(group, Event(group.first_choice + j, finish_reason="length", echo=echo))
            return
        logits = prefill(self.model, self.pool, slots[0], group.prompt)  # (1, V)
        for s in slots[1:]:
            self.pool.copy_row(slots[0], s)
        base_seed = group.sampling.seed if group.sampling.seed is not None else secrets.randbits(62)
        for j, slot in enumerate(slots):
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(base_seed + j)
            r = _Running(
                group=group,
                choice=group.first_choice + j,
                slot=slot,
                last=-1,
                generator=gen,
                text=TokenText(self.tokenizer),
                matcher=StopMatcher(group.stop),
            )
            self.running.append(r)
            self._advance(r, logits, echo)

    def _prompt_info(self, group: Group) -> list[TokenInfo]:
        """The prompt's tokens for `echo` with `logprobs`: the first has no log-probability (OpenAI: null);
        offsets count from the start of the prompt's text."""
        text = TokenText(self.tokenizer)
        offsets = [text.push(t)[1] for t in group.prompt]
        tok = self.tokenizer
        infos = [TokenInfo(group.prompt[0], token_text(tok, group.prompt[0]), None, None, offsets[0])]
        if len(group.prompt) > 1:
            chosen, top_lp, top_ids = prompt_logprobs(self.model, group.prompt, group.logprobs or 0)
            rows = zip(group.prompt[1:], offsets[1:], chosen.tolist(), top_lp.tolist(), top_ids.tolist())
            for t, offset, lp, values, ids in rows:
                top = [(token_text(tok, i), v) for v, i in zip(values, ids)] if group.logprobs else None
                infos.append(TokenInfo(t, token_text(tok, t), lp, top, offset))
        return infos

    def _advance(self, r: _Running, logits: torch.Tensor, echo: Sequence[TokenInfo] = ()) -> None:
        """Choose the next token of `r` from its (1, V) logits and report it; end `r` when it is done."""
        g = r.group
        token = int(sample_next(logits, g.sampling, r.generator)[0])
        r.generated += 1
        r.last = token
        eot = token == self.tokenizer.eot_token or token in g.end_ids
        if eot:  # the end of the document or turn: like a stop string, in neither the text nor the logprobs
            piece = r.text.flush()
        else:
            piece, start = r.text.push(token)
            if g.logprobs is not None:
                r.held.append(self._token_info(logits[0], token, g.logprobs, start))
        text, hit = r.matcher.feed(piece)
        finish = "stop" if hit else None
        if finish is None and (eot or r.generated >= g.max_tokens):
            tail, hit = r.matcher.feed("" if eot else r.text.flush())
            text += tail if hit else tail + r.matcher.flush()
            finish = "stop" if eot or hit else "length"
        r.released += len(text)
        # Report the tokens whose text has begun to go out; at a stop string the rest are dropped with
        # their text, at the end of the choice every token left goes out with the last of the text.
        if finish is not None and not hit:
            keep = len(r.held)
        else:
            keep = bisect.bisect_left([t.offset for t in r.held], r.released)
        tokens, r.held = r.held[:keep], ([] if finish else r.held[keep:])
        if finish is not None:  # the slot is free before the client can see its choice end
            self._release(r)
        self._emit(g, Event(r.choice, text, tokens, finish, completion_tokens=r.generated, echo=list(echo)))

    def _token_info(self, logits: torch.Tensor, token: int, top_n: int, offset: int) -> TokenInfo:
        # The model's own distribution (temperature 1, nothing filtered), as OpenAI's logprobs are.
        logp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        top, top_ids = None, None
        if top_n > 0:
            values, ids = torch.topk(logp, top_n)
            top_ids = ids.tolist()
            top = [(token_text(self.tokenizer, i), float(v)) for v, i in zip(values, top_ids)]
        return TokenInfo(token, token_text(self.tokenizer, token), float(logp[token]), top, offset, top_ids)

    def _release(self, r: _Running) -> None:
        self.running.remove(r)
        self.free.append(r.slot)

    @staticmethod
    def _emit(group: Group, event: Event) -> None:
        """Hand an event to the group's client. A callback that raises (its event loop closed at
        shutdown) must not end the engine thread: the group is dropped before the next step instead."""
        if group.cancelled:
            return
        try:
            group.emit(event)
        except Exception:
            group.cancelled = True

    def fail_all(self, message: str) -> None:
        for r in list(self.running):
            self._release(r)
            self._emit(r.group, Event(r.choice, error=message))


class Engine:
    """Every model the server serves, and the one thread that decodes them all.

    One thread, because the models share the machine's cores: with two models running (the
    playground's compare mode), their decode steps alternate instead of competing for the cores.
    """

    def __init__(self, runners: Sequence[ModelRunner], max_queue: int, prefill_budget: int = 512) -> None:
        if not runners:
            raise ValueError("an Engine needs at least one model")
        self.runners = {r.name: r for r in runners}
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- called from the HTTP side (any thread) ------------------------------------------------------

    def submit(self, groups: Sequence[Group]) -> None:
        """Queue a request's groups together, or raise QueueFull (and queue none of them)."""
        for g in groups:
            runner = self.runners[g.model]
            if ModelRunner._slots_needed(g) > runner.max_batch:  # it could never be admitted
                raise ValueError(f"n={g.n} is more than the {runner.max_batch} sequences {g.model!r} decodes at once")
        with self._cond:
            waiting = self.waiting_count()
            if waiting + len(groups) > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {waiting} prompt(s) are waiting and the queue holds {self.max_queue}; "
                    "retry later"
                )
            for g in groups:
                self.runners[g.model].waiting.append(g)
            self._cond.notify()

    def cancel(self, groups: Sequence[Group]) -> None:
        """Free the slots of these groups before the next decode step (their client went away)."""
        with self._cond:
            for g in groups:
                g.cancelled = True
            self._cond.notify()

    def waiting_count(self) -> int:
        return sum(len(r.waiting) for r in self.runners.values())

    def running_count(self) -> int:
        return sum(len(r.running) for r in self.runners.values())

    # -- the engine thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpt2lab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _has_work(self) -> bool:
        return any(r.running or r.waiting for r in self.runners.values())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                for runner in self.runners.values():
                    runner.drop_cancelled()
            self.round()

    def round(self) -> None:
        """Admit what can start, then one decode step for each model with running sequences."""
        for runner in self.runners.values():
            try:
                runner.admit(self.prefill_budget, self._cond)
                runner.step()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving the others
                runner.fail_all(f"internal error while decoding: {type(e).__name__}: {e}")
        self.steps += 1
