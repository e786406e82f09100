"""gpt2lab as a model of EleutherAI's lm-evaluation-harness, so that its tasks (HellaSwag, ARC, PIQA,
LAMBADA, WikiText, ...) score a gpt2lab model directly, without exporting it first.

    python -m gpt2lab.eval.lm_eval run --model gpt2lab --model_args pretrained=runs/x --tasks lambada_openai
    gpt2lab eval --model runs/x --lm-eval hellaswag,lambada_openai --json report.json

The harness asks three questions; the answers follow its `hf` model (lm_eval/models/huggingface.py),
so that both give the same numbers for the same weights:
  - loglikelihood: the harness splits context and continuation into tokens (TemplateLM._encode_pair,
    trailing spaces moved to the continuation); the row is the last max_length + 1 tokens of both,
    and the answer is the summed log-probability of the continuation tokens and whether each was the
    model's greedy choice. Only the continuation's positions go through the output projection
    (common.hidden_at + the model's head). On a CPU, requests that share a context (the choices of a
    multiple-choice item) run it once into a KV cache and their continuations on top of it, as
    gpt2lab's own HellaSwag does; elsewhere each request is a full row, a batch at a time.
  - loglikelihood_rolling: the harness's own windows (lm_eval.utils.get_rolling_token_windows):
    <|endoftext|> first, then disjoint chunks of max_length predicted tokens, each read with the
    max_length tokens before its last one. gpt2lab's perplexity windows differ (a window of T tokens
    predicts T - 1 of them), so they are not used here.
  - generate_until: greedy (or sampled, as the request asks) decoding on the KV cache
    (gpt2lab.generate), cut at the first stop string, the context left-truncated to
    max_length - max_gen_toks tokens.

The harness is imported on first use of `GPT2LabLM` (PEP 562), so `gpt2lab` works without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import GPT2LabError
from ..model import GPT, KVCache
from ..runtime import autocast
from ..tokenizer import Tokenizer
from .common import evaluating, hidden_at, nll_chunk_rows

MODEL_NAME = "gpt2lab"
INSTALL_HINT = "pip install 'gpt2lab[lm-eval]'"

Request = tuple[Any, list[int], list[int]]  # (strings, context tokens, continuation tokens)


def import_harness():
    """The lm_eval package, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.api.registry
    except ImportError:
        raise GPT2LabError(f"lm-evaluation-harness is not installed; run: {INSTALL_HINT}") from None
    return lm_eval


# ----------------------------------------------------------------------------- scoring


def _row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """The model's input for one request, as the `hf` model cuts it: (prefix, tail). The last
    max_length + 1 tokens of context + continuation, less the last one, are the input; its last
    len(continuation) positions predict the continuation. `tail` is those positions' tokens, `prefix`
    the ones before (what requests with the same context share)."""
    n = len(continuation)
    if n == 0:
        raise GPT2LabError("lm-eval asked for the likelihood of an empty continuation")
    if n > max_length:
        raise GPT2LabError(f"a continuation of {n} tokens does not fit the model's context of {max_length}")
    inp = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    return inp[: len(inp) - n], inp[len(inp) - n :]


def _answers(gpt: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and whether it is the argmax, from (N, C) hidden states: (N,) float64
    and (N,) bool. The logits are made a chunk of positions at a time, as common.token_nll makes them."""
    chunk = nll_chunk_rows(hidden.device)
    logp = torch.empty(hidden.size(0), dtype=torch.float64, device=hidden.device)
    greedy = torch.empty(hidden.size(0), dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        end = min(start + chunk, hidden.size(0))
        logits = gpt.head(hidden[start:end]).float()  # (c, V)
        t = targets[start:end]
        logp[start:end] = torch.log_softmax(logits, dim=-1).gather(1, t.unsqueeze(1)).squeeze(1).double()
        greedy[start:end] = logits.argmax(dim=-1) == t
    return logp, greedy


def _per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=dtype, device=values.device).index_add_(0, rows, values.to(dtype))


Row = tuple[list[int], list[int], list[int]]  # (prefix, tokens fed after it, continuation)


def _prefill(gpt: GPT, rows: Sequence[Row], width: int, device: torch.device, cache_dtype: torch.dtype) -> KVCache:
    """A KV cache holding each row's prefix, for `width` more tokens: every distinct prefix runs once
    (one padded batch), and the rows that share it copy its keys and values."""
    leaders: dict[tuple[int, ...], int] = {}
    for i, (prefix, _, _) in enumerate(rows):
        leaders.setdefault(tuple(prefix), i)
    longest = max(len(p) for p in leaders)
    cache = KVCache(gpt.config, len(rows), longest + width, device=device, dtype=cache_dtype)
    idx = torch.zeros(len(leaders), longest, dtype=torch.long)  # (G, P), right-padded
    for g, prefix in enumerate(leaders):
        idx[g, : len(prefix)] = torch.tensor(prefix)
    gpt.hidden_states(idx.to(device), cache.select(list(leaders.values())))
    for prefix, leader in leaders.items():
        # Positions past a prefix hold padding: the row continues right after its own prefix, and its
        # own tokens overwrite them or the causal mask hides them.
        cache.pos[leader] = len(prefix)
    for i, (prefix, _, _) in enumerate(rows):
        if leaders[tuple(prefix)] != i:
            cache.copy_row(leaders[tuple(prefix)], i)
    return cache


def _score_rows(
    gpt: GPT, rows: Sequence[Row], device: torch.device, cache_dtype: torch.dtype
) -> list[tuple[float, bool]]:
    """Rows whose prefixes run first into a KV cache (each distinct one once) or, with empty prefixes,
    full rows in one padded batch. The last len(continuation) positions of each row's fed tokens
    predict its continuation."""
    width = max(len(feed) for _, feed, _ in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), right-padded: causal, never read
    r_list, c_list, targets = [], [], []
    for i, (_, feed, cont) in enumerate(rows):
        idx[i, : len(feed)] = torch.tensor(feed)
        r_list += [i] * len(cont)
        c_list += range(len(feed) - len(cont), len(feed))
        targets += cont
    r, c, tgt = (torch.tensor(v, dtype=torch.long, device=device) for v in (r_list, c_list, targets))  # (N,) each
    cache = _prefill(gpt, rows, width, device, cache_dtype) if rows[0][0] else None
    logp, greedy = _answers(gpt, hidden_at(gpt, idx.to(device), r, c, cache=cache), tgt)
    sums = _per_row(logp, r, len(rows), torch.float64).tolist()
    misses = _per_row(~greedy, r, len(rows), torch.int64).tolist()
    return [(s, m == 0) for s, m in zip(sums, misses)]


def _shared_batches(cut: Sequence[Row], groups: list[list[int]], batch_size: int, block: int) -> list[list[int]]:
    """Up to `batch_size` groups (requests with one prefix) per forward pass, longest prefixes first,
    as long as the longest prefix and the widest fed tokens fit the model's context together."""
    groups = sorted(groups, key=lambda g: -len(cut[g[0]][0]))
    batches: list[list[int]] = []
    count, longest, width = 0, 0, 0
    for g in groups:
        g_width = max(len(cut[i][1]) for i in g)
        if batches and count < batch_size and longest + max(width, g_width) <= block:
            batches[-1] += g
            count, width = count + 1, max(width, g_width)
        else:
            batches.append(list(g))
            count, longest, width = 1, len(cut[g[0]][0]), g_width
    return batches


def score_requests(
    gpt: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    share_context: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether every continuation token is the greedy one)
    for each (context tokens, continuation tokens), in the order given.

    share_context (default: on a CPU): requests whose inputs share everything before the scored
    positions run that prefix once into a KV cache, one group of them per forward pass; the others go
    `batch_size` full rows per forward pass, longest first so that similar lengths are padded together.
    """
    device = gpt.device
    share = device.type == "cpu" if share_context is None else share_context
    cut = [(*_row(ctx, cont, gpt.config.block_size), list(cont)) for ctx, cont in requests]
    groups: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (prefix, _, _) in enumerate(cut):
        if share and prefix:
            groups.setdefault(tuple(prefix), []).append(i)
        else:
            rest.append(i)
    rest.sort(key=lambda i: -(len(cut[i][0]) + len(cut[i][1])))
    batches = [(True, b) for b in _shared_batches(cut, list(groups.values()), batch_size, gpt.config.block_size)]
    batches += [(False, rest[i : i + batch_size]) for i in range(0, len(rest), batch_size)]
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(cut)
    cache_dtype = autocast_dtype or gpt.lm_head.weight.dtype
    from tqdm.auto import tqdm

    with evaluating(gpt), tqdm(total=len(cut), desc="lm-eval", unit="request", disable=not progress) as bar:
        for shared, batch in batches:
            # A full row feeds its whole input: the prefix goes in front of the scored tokens.
            rows = [cut[i] if shared else ([], cut[i][0] + cut[i][1], cut[i][2]) for i in batch]
            with autocast(device, autocast_dtype):
                for i, answer in zip(batch, _score_rows(gpt, rows, device, cache_dtype)):
                    answers[i] = answer
            bar.update(len(batch))
    return answers


# ----------------------------------------------------------------------------- the harness's model


def _batch_size(value: int | str | None) -> int:
    # The harness passes its --batch_size through as given ("8", or "auto", which gpt2lab does not probe).
    if value in (None, "auto") or str(value).startswith("auto"):
        return 8
    size = int(value)  # type: ignore[arg-type]
    if size < 1:
        raise GPT2LabError(f"batch_size must be at least 1, got {size}")
    return size


class _HarnessMethods:
    """The methods of `GPT2LabLM`; the class itself is made on first use, on the harness's TemplateLM.

    pretrained: what `gpt2lab.load_model` takes (a run, a checkpoint, a Hugging Face directory or Hub
    name), or `model` and `tokenizer` already built. device, dtype, batch_size as `gpt2lab eval` has them.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: GPT | None = None,
        tokenizer: Tokenizer | str | None = None,
        device: str | None = "cpu",
        dtype: str | None = "float32",
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        progress: bool = False,
        **unused: Any,
    ) -> None:
        super().__init__()  # type: ignore[call-arg]
        if model is None:
            if pretrained is None:
                raise GPT2LabError("the gpt2lab harness model needs pretrained=MODEL (a run, checkpoint or HF dir)")
            from .. import accel
            from ..checkpoint import load_model_and_tokenizer
            from ..runtime import resolve_device, resolve_dtype

            model, tokenizer = load_model_and_tokenizer(
                pretrained,
                device=resolve_device(device or "auto"),
                dtype=resolve_dtype(accel.inference_dtype(dtype or "float32")),
                tokenizer=tokenizer,
            )
            accel.apply_inference_dtype(model, dtype or "float32")
            accel.pack_for_inference(model, 64)  # on a CPU, the weights' fastest layout here (gpt2lab/accel)
        elif not isinstance(tokenizer, Tokenizer):
            from ..tokenizer import get_tokenizer

            tokenizer = get_tokenizer(tokenizer or "gpt2")
        self.gpt, self.tok = model, tokenizer
        self.batch = _batch_size(batch_size)
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token

    @property
    def max_length(self) -> int:
        return self.gpt.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As Hugging Face's GPT-2 tokenizer reads text: "<|endoftext|>" in it is the special token.
        return self.tok.encode(string, allowed_special="all")

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any):
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return score_requests(self.gpt, pairs, batch_size=self.batch, progress=self.progress and not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        scored = score_requests(self.gpt, windows, batch_size=self.batch, progress=self.progress and not disable_tqdm)
        for i, (logp, _) in zip(owner, scored):
            totals[i] += logp
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        out = []
        eos = self.tok.decode([self.eot_token_id])
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            out.append(self._generate(context, until, kwargs))
        return out

    def _generate(self, context: str, until: list[str], kwargs: dict[str, Any]) -> str:
        from ..generate import SamplingParams, generate_tokens

        max_gen = int(kwargs.get("max_gen_toks", 256))
        if max_gen >= self.max_length:
            raise GPT2LabError(f"max_gen_toks {max_gen} must be below the model's context of {self.max_length}")
        prompt = self.tok_encode(context)[-(self.max_length - max_gen) :]
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        sampling = SamplingParams(
            temperature=temperature,
            top_k=kwargs.get("top_k"),
            top_p=kwargs.get("top_p"),
            seed=kwargs.get("seed"),
            stop_token=self.eot_token_id,
        )
        tokens: list[int] = []
        text = ""
        for nxt in generate_tokens(self.gpt, prompt, max_gen, sampling=sampling):
            tokens.append(int(nxt[0]))
            text = self.tok.decode(tokens)
            if any(stop in text for stop in until):
                break
        for stop in until:  # the text before the first stop string, as the harness's `hf` model cuts it
            text = text.split(stop)[0]
        return text


def model_class() -> type:
    """`GPT2LabLM`: the harness's TemplateLM with gpt2lab's answers, made once."""
    cls = globals().get("GPT2LabLM")
    if cls is None:
        harness = import_harness()
        cls = type("GPT2LabLM", (_HarnessMethods, harness.api.model.TemplateLM), {"__module__": __name__})
        globals()["GPT2LabLM"] = cls
    return cls


def register() -> type:
    """Register `gpt2lab` as a harness model (`--model gpt2lab`) and return its class."""
    cls = model_class()
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model(MODEL_NAME) is cls:
            return cls
    except ValueError:  # not registered yet
        pass
    register_model(MODEL_NAME)(cls)
    return cls


def __getattr__(name: str) -> Any:
    # PEP 562: `GPT2LabLM` exists once the harness is imported, which only its users pay for.
    if name == "GPT2LabLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_tasks(
    model: GPT,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The harness's `simple_evaluate` of `tasks` on a built model, in this process: its whole result
    dict. include_path: a folder of task YAMLs (the harness's --include_path), for local tasks."""
    import_harness()
    register()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = model_class()(model=model, tokenizer=tokenizer, batch_size=batch_size, progress=progress)
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path is not None else ""
        raise GPT2LabError(f"lm-eval has no task {', '.join(missing)}{where}; list them with: lm-eval ls tasks")
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if results is None:  # only on ranks other than 0 of a distributed harness run
        raise GPT2LabError("lm-eval returned no results")
    return results


def report(results: dict[str, Any]) -> dict[str, Any]:
    """What `gpt2lab eval --json` keeps of a harness result: each task's numbers, its version and
    few-shot setting, the sample counts, and the harness's version; JSON-safe."""
    import lm_eval

    keep = {k: results.get(k) for k in ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")}
    keep = {k: v for k, v in keep.items() if v}
    return {"harness_version": lm_eval.__version__, **json.loads(json.dumps(keep, default=str))}


def main() -> None:
    """The harness's own command line with `--model gpt2lab` available: the `lm_eval` script itself
    only knows the models inside the harness."""
    import gpt2lab.eval.lm_eval as this  # one copy of the class, also under python -m

    this.register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
