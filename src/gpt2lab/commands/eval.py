"""Evaluate GPT-2 or a gpt2lab checkpoint: HellaSwag, validation loss, perplexity, bits per byte and CORE.

Examples:
  gpt2lab eval --model gpt2 --task hellaswag                       # expect acc_norm 0.2955
  gpt2lab eval --model runs/gpt2-124M --task val-loss --data data/fineweb-edu-10B
  gpt2lab eval --model gpt2 --task perplexity --data wikitext-2 --stride 512
  gpt2lab eval --model gpt2 --task perplexity --data notes.txt --json ppl.json
  torchrun --nproc_per_node=8 -m gpt2lab eval --model gpt2-xl --task hellaswag
  gpt2lab eval --model gpt2 --task core --bundle eval_bundle.zip   # DCLM CORE, as nanochat computes it
  gpt2lab eval --model runs/x --lm-eval hellaswag,arc_easy --json r.json   # lm-evaluation-harness tasks

--data is, per task: hellaswag  a JSONL file in the official schema (default: the official validation
set, downloaded once); val-loss  a directory made by 'gpt2lab prepare' (its val split); perplexity  a
text, JSONL or Parquet file (or a directory or glob of them; documents joined with --join),
hf:DATASET (with --hf-config, --split) or wikitext-2 (wikitext-2-raw-v1, test split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import GPT2LabError
from ..fileio import atomic_write_json

TASKS = ("hellaswag", "val-loss", "perplexity", "core")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="gpt2", help="Hub name, HF directory, or gpt2lab checkpoint/run dir (default: gpt2)"
    )
    p.add_argument("--task", choices=TASKS, help="what to measure (or --lm-eval, or both)")
    p.add_argument("--data", default=None, metavar="PATH", help="the data to evaluate on (see above)")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the checkpoint's, or GPT-2's)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="items or windows per forward pass (default 8; HellaSwag on CPU runs one item at a time, "
        "its context shared by the 4 endings)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="weights dtype: float32 | bfloat16 | float16 | int8 (int8: 8-bit weights, CPU only; default: float32)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write every number, the model, data and method here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("hellaswag")
    g.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score the first N items only (core: of each task)"
    )
    g = p.add_argument_group("lm-eval (pip install 'gpt2lab[lm-eval]')")
    g.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="lm-evaluation-harness tasks, comma-separated (hellaswag,arc_easy,lambada_openai,...), run on this "
        "model in this process; the results go into the table and --json beside --task's",
    )
    g.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of task YAMLs (local tasks)")
    g.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples (default: the task's)")
    g = p.add_argument_group("core")
    g.add_argument(
        "--bundle",
        default=None,
        metavar="DIR_OR_ZIP",
        help="nanochat's eval_bundle, a folder or its zip (default: downloaded once into gpt2lab's cache)",
    )
    g = p.add_argument_group("val-loss")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="val-loss: token budget (default 10485760, build-nanogpt's); perplexity: first N tokens (default all)",
    )
    g.add_argument("--seq-len", type=int, default=None, metavar="T", help="window length (default: model's context)")
    g = p.add_argument_group("perplexity")
    g.add_argument("--context", type=int, default=None, metavar="T", help="window length (default: model's context)")
    g.add_argument(
        "--stride", type=int, default=None, metavar="S", help="window step (default: context / 2, as the HF guide)"
    )
    g.add_argument("--bos", action="store_true", help="put <|endoftext|> first so the first token is scored too")
    g.add_argument("--hf-config", default=None, help="configuration of an hf:DATASET")
    g.add_argument("--split", default=None, help="split of an hf:DATASET (default: test)")
    g.add_argument("--text-field", default="text", help="text column of a dataset (default: text)")
    g.add_argument("--join", default="\\n\\n", help="separator between documents (default: \\n\\n, as HF's guide)")


def _check(args: argparse.Namespace) -> None:
    for name in ("batch_size", "limit", "max_tokens", "seq_len", "context", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise GPT2LabError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.task is None and args.lm_eval is None:
        raise GPT2LabError("say what to measure: --task TASK, --lm-eval TASKS, or both (see 'gpt2lab eval --help')")
    if args.task in ("val-loss", "perplexity") and args.data is None:
        raise GPT2LabError(f"--task {args.task} needs --data (see 'gpt2lab eval --help')")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from .. import accel, distributed
    from ..checkpoint import load_model_and_tokenizer
    from ..eval.common import EvalContext
    from ..runtime import resolve_dtype

    dist = distributed.setup(args.device)
    device = dist.device
    try:
        dtype = resolve_dtype(accel.inference_dtype(args.dtype))
        model, tok = load_model_and_tokenizer(args.model, device=device, dtype=dtype, tokenizer=args.tokenizer)
        accel.apply_inference_dtype(model, args.dtype)
        accel.pack_for_inference(model, 64)  # on a CPU, the weights' fastest layout here (gpt2lab/accel)
        started = time.perf_counter()
        tasks = {"hellaswag": _hellaswag, "val-loss": _val_loss, "perplexity": _perplexity, "core": _core}
        task = tasks.get(args.task)
        ctx = EvalContext(
            device=device,
            rank=dist.rank,
            world_size=dist.world_size,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        rows, report = task(args, model, tok, ctx) if task else ([], {"method": LM_EVAL_METHOD})
        if args.lm_eval:
            lm_rows, report["lm_eval"] = _lm_eval(args, model, tok, dist.world_size)
            rows += lm_rows
        seconds = time.perf_counter() - started
        if dist.is_main:
            report = {
                "task": args.task or "lm-eval",
                "model": _model_info(args.model, model, tok),
                **report,
                "run": {
                    "device": device.type,
                    "dtype": "int8" if accel.is_int8(model) else str(dtype).removeprefix("torch."),
                    "world_size": dist.world_size,
                    "batch_size": args.batch_size,
                    "seconds": round(seconds, 3),
                    "gpt2lab_version": __version__,
                },
            }
            _print_table(args, model, rows, report, seconds)
            if args.json:
                atomic_write_json(args.json, report)
    finally:
        distributed.teardown()
    return 0


# ----------------------------------------------------------------------------- tasks


def _hellaswag(args, model, tok, ctx) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    from ..eval import hellaswag
    from ..eval.references import HELLASWAG_GPT2_CHECKPOINTS, HELLASWAG_REFERENCES
    from ..fileio import file_sha256

    path = hellaswag.validation_file(args.data, ctx.rank, ctx.world_size)
    items = hellaswag.read_items(path, args.limit)
    result = hellaswag.evaluate(model, tok, items, ctx)
    expected = HELLASWAG_GPT2_CHECKPOINTS.get(_hub_short_name(args.model), {})
    refs = ", ".join(f"{k} {v}" for k, v in HELLASWAG_REFERENCES.items())
    rows = [
        ("acc_norm", f"{result.acc_norm:.4f}" + (f"  (expected {expected['acc_norm']})" if expected else "")),
        ("acc", f"{result.acc:.4f}" + (f"  (expected {expected['acc']})" if "acc" in expected else "")),
        ("items", f"{result.items}" + (f" (--limit {args.limit})" if args.limit else f" ({path.name})")),
        ("references", f"acc_norm {refs}"),
    ]
    report = {
        "data": {
            "path": str(path),
            "sha256": file_sha256(path),
            "official": args.data is None,
            "items": result.items,
            "limit": args.limit,
        },
        "method": hellaswag.METHOD,
        "results": result.to_dict(),
        "references": {"acc_norm": HELLASWAG_REFERENCES, "expected_for_this_checkpoint": expected or None},
    }
    return rows, report


def _core(args, model, tok, ctx) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    from ..eval import core
    from ..eval.references import CORE_REFERENCES
    from ..fileio import file_sha256

    path = core.bundle_path(args.bundle, ctx.rank)
    result = core.evaluate(model, tok, core.Bundle(path), ctx, limit=args.limit)
    rows = [
        (t.label, f"accuracy {t.accuracy:.4f}  centred {t.centered:.4f}  ({t.items} items, {t.num_fewshot}-shot)")
        for t in result.tasks
    ]
    expected = CORE_REFERENCES.get(_hub_short_name(args.model))
    rows.append(("CORE", f"{result.core:.4f}" + (f"  (expected {expected})" if expected and not args.limit else "")))
    rows.append(("reference", ", ".join(f"{k} {v}" for k, v in CORE_REFERENCES.items()) + " (nanochat)"))
    report = {
        "data": {
            "bundle": str(path),
            "sha256": file_sha256(path) if path.is_file() else None,
            "downloaded": args.bundle is None,
            "limit_per_task": args.limit,
        },
        "method": core.METHOD,
        "results": result.to_dict(),
        "references": {"core": CORE_REFERENCES},
    }
    return rows, report


def _val_loss(args, model, tok, ctx) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    from ..eval.references import VAL_LOSS_REFERENCES
    from ..eval.val_loss import DEFAULT_MAX_TOKENS, open_val_tokens, val_loss

    if Path(args.data).is_file():
        raise GPT2LabError(
            f"--task val-loss reads a directory made by 'gpt2lab prepare', and {args.data} is a file; "
            f"to score a text file, run: gpt2lab eval --task perplexity --data {args.data} --model {args.model}"
        )
    tokens = open_val_tokens(args.data, tok)
    result = val_loss(model, tokens, ctx, max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS, seq_len=args.seq_len)
    rows = [
        ("val loss", f"{result.loss:.4f}"),
        ("perplexity", f"{result.perplexity:.2f}"),
        ("tokens", f"{result.tokens:,} ({result.windows:,} windows of {result.seq_len}, of {len(tokens):,})"),
    ]
    references = VAL_LOSS_REFERENCES if _is_fineweb_edu(Path(args.data)) else {}
    if references:  # measured on FineWeb-Edu's val split: beside any other data it would mislead
        rows.append(("reference", ", ".join(f"{k} {v}" for k, v in references.items()) + " (FineWeb-Edu val)"))
    report = {
        "data": {"path": str(Path(args.data)), "split": "val", "split_tokens": len(tokens)},
        "method": (
            f"mean next-token loss over the first {result.windows} windows of {result.seq_len} + 1 tokens "
            "of the val split (consecutive, overlapping by one token, every target scored once)"
        ),
        "results": result.to_dict(),
        "references": {"val_loss": references} if references else {},
    }
    return rows, report


def _is_fineweb_edu(data_dir: Path) -> bool:
    """Whether a prepared directory holds FineWeb-Edu: its manifest's source, or llm.c's shard names."""
    from ..data.shards import MANIFEST_NAME, read_manifest

    if (data_dir / MANIFEST_NAME).exists():
        source = read_manifest(data_dir).get("source", {})
        return "fineweb-edu" in f"{source.get('preset', '')} {source.get('dataset', '')}".lower()
    return any(data_dir.glob("edu_fineweb_val_*.bin"))


def _perplexity(args, model, tok, ctx) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    from ..data.text import unescape
    from ..eval import perplexity
    from ..eval.references import WIKITEXT2_HF_GUIDE_GPT2_LARGE, WIKITEXT2_PAPER_PERPLEXITY

    join = unescape(args.join)  # "\n\n" typed on a command line
    corpus = perplexity.read_corpus(args.data, args.text_field, args.hf_config, args.split, join)
    tokens, n_bytes = perplexity.corpus_tokens(corpus, tok, bos=args.bos, max_tokens=args.max_tokens)
    result = perplexity.evaluate(model, tokens, ctx, context=args.context, stride=args.stride, n_bytes=n_bytes)
    unscored = result.tokens - result.scored_tokens
    rows = [
        ("perplexity", f"{result.perplexity:.4f}"),
        ("bits/byte", f"{result.bits_per_byte:.4f}"),
        ("loss", f"{result.loss:.4f} nats/token ({result.bits_per_token:.4f} bits/token)"),
        ("scored", f"{result.scored_tokens:,} tokens" + (f" ({unscored} not scored: see method)" if unscored else "")),
        ("text", f"{n_bytes:,} bytes, {result.windows:,} windows (context {result.context}, stride {result.stride})"),
    ]
    references: dict[str, Any] = {}
    if corpus.source.get("name") == "wikitext-2":
        references = {
            "gpt2_paper_table3": WIKITEXT2_PAPER_PERPLEXITY,
            "hf_guide_gpt2_large_by_stride": WIKITEXT2_HF_GUIDE_GPT2_LARGE,
        }
        rows.append(("reference", f"GPT-2 paper (detokenized): {WIKITEXT2_PAPER_PERPLEXITY}"))
    report = {
        "data": {**corpus.source, "bos": args.bos, "max_tokens": args.max_tokens},
        "method": perplexity.method(result.context, result.stride, args.bos),
        "results": result.to_dict(),
        "references": references,
    }
    return rows, report


LM_EVAL_METHOD = "lm-evaluation-harness: each task as the harness defines it (prompt, metrics, few-shot)"


def _lm_eval(args, model, tok, world_size: int) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The harness's tasks on the loaded model: a row per task and metric, and the harness's report."""
    from ..eval import lm_eval

    if world_size > 1:
        raise GPT2LabError("--lm-eval runs in one process; run it without torchrun")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise GPT2LabError("--lm-eval needs task names, e.g. --lm-eval hellaswag,arc_easy")
    results = lm_eval.run_tasks(
        model,
        tok,
        tasks,
        include_path=args.lm_eval_include,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    report = lm_eval.report(results)
    rows = []
    for task, metrics in report["results"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, float) and not name.endswith("_stderr"):
                rows.append((f"{task} {name}" + ("" if filt in ("", "none") else f" ({filt})"), f"{value:.4f}"))
    return rows, report


# ----------------------------------------------------------------------------- output


def _hub_short_name(name: str) -> str:
    """'gpt2' for the Hub names of OpenAI's checkpoints; a local path gets no expected numbers."""
    return "" if Path(name).expanduser().exists() else str(name).removeprefix("openai-community/")


def _model_info(source: str, model, tok) -> dict[str, Any]:
    return {
        "source": str(source),
        "parameters": model.num_params(),
        "config": model.config.to_dict(),
        "tokenizer": tok.info(),
    }


def _print_table(args, model, rows: list[tuple[str, str]], report: dict[str, Any], seconds: float) -> None:
    run = report["run"]
    head = (
        f"{report['task']} | {args.model} ({model.num_params() / 1e6:.1f}M parameters) | {run['device']} {run['dtype']}"
        f" | {run['world_size']} process(es) | {seconds:.1f}s"
    )
    width = max(len(k) for k, _ in rows)
    out = sys.stdout
    out.write(head + "\n")
    for key, value in rows:
        out.write(f"  {key:<{width}}  {value}\n")
    out.write(f"  {'method':<{width}}  {report['method']}\n")
    if args.json:
        out.write(f"  {'json':<{width}}  {args.json}\n")
    out.flush()
