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
    multiple-choice item) share a row: the context once, then each continuation at the positions
    after it, seeing the context and itself only; elsewhere each request is a full row, a batch at a time.
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
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import GPT2LabError
from ..model import GPT
from ..runtime import autocast, keep_freed_memory
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
        greedy[start:end] = logits.max(dim=-1).indices == t  # the first of equal maxima, as argmax, in less time
    return logp, greedy


def _per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=dtype, device=values.device).index_add_(0, rows, values.to(dtype))


Cut = tuple[list[int], list[int], list[int]]  # (prefix, tokens fed after it, continuation)
Row = tuple[list[int], list[int]]  # (a prefix, the requests whose fed tokens follow it in one row)


class _SharedPrefixRows:
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


def _rows(cut: Sequence[Cut], share: bool, block: int) -> list[Row]:
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
        layout = _SharedPrefixRows(pos.to(device), (causal & seen).unsqueeze(1).to(device))
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
) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether every continuation token is the greedy one)
    for each (context tokens, continuation tokens), in the order given.

    share_context (default: on a CPU): requests whose inputs share everything before the scored
    positions go in one row, that prefix once and each request's tokens after it (_SharedPrefixRows);
    otherwise each request is a row of its own. `batch_size` rows per forward pass, longest first, so
    that similar lengths are padded together.
    """
    device = gpt.device
    share = device.type == "cpu" if share_context is None else share_context
    block = gpt.config.block_size
    cut = [(*_row(ctx, cont, block), list(cont)) for ctx, cont in requests]
    rows = sorted(_rows(cut, share, block), key=lambda row: -(len(row[0]) + sum(len(cut[i][1]) for i in row[1])))
    answers: list[tuple[float, bool]] = [(0.0, False)] * len(cut)
    from tqdm.auto import tqdm

    with evaluating(gpt), tqdm(total=len(cut), desc="lm-eval", unit="request", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            order = [i for _, members in batch for i in members]
            with autocast(device, autocast_dtype):
                for i, answer in zip(order, _score_rows(gpt, cut, batch)):
                    answers[i] = answer
            bar.update(len(order))
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

            if device and device.startswith("cuda") and not torch.cuda.is_available():
                # The harness's command line asks for cuda:0 unless told otherwise; its `hf` model then runs
                # where it can, and so does this one.
                print(f"gpt2lab: no CUDA GPU here for device {device!r}; running on the CPU", file=sys.stderr)
                device = "auto"
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
        if model.device.type == "cpu":
            # Each forward pass allocates tensors of tens of MB anew: reuse the freed ones rather than
            # page-fault fresh ones in (runtime.keep_freed_memory; the trainer does the same).
            keep_freed_memory()
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
