"""lm-evaluation-harness scoring speed: `--model gpt2lab` vs the harness's own `--model hf`, same run.

GPT-2 124M with random weights; the `hf` model reads them from the Hugging Face directory gpt2lab
exports (`export_hf`), so both score the same weights. Two local tasks, written here as the harness's
YAML over JSONL files: HellaSwag-shaped multiple choice (bench/eval.py's synthetic items, 4 choices)
and a wikitext-shaped rolling perplexity over a few long documents. Each model is built once, both
are warmed up, then the tasks run `--repeats` times in turn; the time inside the model's
loglikelihood / loglikelihood_rolling (what the model does, without the harness's task building)
is reported as medians, with the ratio, and the harness's metrics, which must agree.

    python bench/harness.py                  # CPU, float32, as docs/performance.md
    python bench/harness.py --items 200 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from eval import WORDS, build, synthetic_items
from machine import cpu_features, cpu_name


def write_tasks(folder: Path, items: list[dict], docs: list[str]) -> None:
    with open(folder / "mc.jsonl", "w") as f:
        f.writelines(json.dumps({"ctx": r["ctx"], "endings": r["endings"], "label": r["label"]}) + "\n" for r in items)
    with open(folder / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\n" + head.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "bench_rolling.yaml").write_text(
        "task: bench_rolling\n" + head.format(folder / "docs.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )


def timed_model(lm, calls: dict[str, float]):
    """Add the seconds of each scoring call the harness makes on `lm` to `calls`, by method."""
    for name in ("loglikelihood", "loglikelihood_rolling"):
        inner = getattr(lm, name)

        def wrapper(requests, *a, _inner=inner, _name=name, **k):
            t0 = time.perf_counter()
            out = _inner(requests, *a, **k)
            calls[_name] = calls.get(_name, 0.0) + time.perf_counter() - t0
            return out

        setattr(lm, name, wrapper)
    return lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40, help="multiple-choice items")
    ap.add_argument("--docs", type=int, default=2, help="rolling-perplexity documents (about 2,500 tokens each)")
    ap.add_argument("--batch-size", type=int, default=8, help="both models' batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from gpt2lab import get_tokenizer
    from gpt2lab.accel import pack_for_inference, unpack
    from gpt2lab.eval import lm_eval
    from gpt2lab.hf import export_hf

    device = torch.device(args.device)
    tok = get_tokenizer()
    _, ours = build(device)
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(2500)) + "." for _ in range(args.docs)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tasks(folder, synthetic_items(args.items), docs)
        unpack(ours)  # the plain parameters, under GPT-2's names
        export = export_hf(ours, folder / "export", tok)
        pack_for_inference(ours, 64)  # as `gpt2lab eval` runs it
        calls: dict[str, dict[str, float]] = {"gpt2lab": {}, "hf": {}}
        models = {
            "gpt2lab": lm_eval.model_class()(model=ours, tokenizer=tok, batch_size=args.batch_size),
            "hf": get_model("hf")(pretrained=str(export), device=args.device, batch_size=args.batch_size),
        }
        for name, lm in models.items():
            timed_model(lm, calls[name])
        manager = TaskManager(include_path=str(folder))
        tasks = ["bench_mc", "bench_rolling"]
        results: dict[str, dict] = {}
        scoring: dict[str, dict[str, list[float]]] = {name: {} for name in models}
        load_before = os.getloadavg()[0]  # the ratio means little on a machine shared with other jobs
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, lm in models.items():
                calls[name].clear()
                out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0)
                results[name] = out["results"]
                for method, seconds in calls[name].items():
                    if repeat:
                        scoring[name].setdefault(method, []).append(seconds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; {cpu_features()}")
    print(f"load average (1 minute): {load_before:.2f} before the timed rounds, {os.getloadavg()[0]:.2f} after")
    print(
        f"GPT-2 124M (random weights), float32, {device}, batch {args.batch_size}; {args.items} multiple-choice "
        f"items, {args.docs} documents of rolling perplexity; median of {args.repeats} runs"
    )
    print(f"{'':>24} {'gpt2lab s':>10} {'hf s':>8} {'ratio':>7}")
    for method in ("loglikelihood", "loglikelihood_rolling"):
        ours_s, hf_s = (statistics.median(scoring[name][method]) for name in ("gpt2lab", "hf"))
        print(f"{method:>24} {ours_s:>10.2f} {hf_s:>8.2f} {hf_s / ours_s:>6.2f}x")
    for task in tasks:
        for name in models:
            shown = {k: round(v, 6) for k, v in results[name][task].items() if isinstance(v, float)}
            print(f"  {task} --model {name}: {shown}")


if __name__ == "__main__":
    main()
