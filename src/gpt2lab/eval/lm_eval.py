"""gpt2lab as a model of EleutherAI's lm-evaluation-harness, so that its tasks (HellaSwag, ARC, PIQA,
LAMBADA, WikiText, ...) score a gpt2lab model directly, without exporting it first.

    gpt2lab-lm-eval run --model gpt2lab --model_args pretrained=runs/x --tasks lambada_openai
    gpt2lab eval --model runs/x --lm-eval hellaswag,lambada_openai --json report.json

The harness asks three questions; the answers follow its `hf` model (lm_eval/models/huggingface.py),
so that both give the same numbers for the same weights:
  - loglikelihood: the harness splits context and continuation into tokens (TemplateLM._encode_pair,
    trailing spaces moved to the continuation); the row is the last max_length + 1 tokens of both,
    and the answer is the summed log-probability of the continuation tokens and whether each was the
    model's greedy choice (scoring.score_requests, which gpt2lab's HellaSwag uses too).
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
from ..runtime import keep_freed_memory
from ..tokenizer import Tokenizer
from .scoring import score_requests

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
