"""`make demo`: train a small GPT-2 on this CPU in a few minutes, offline, and show what it learned.

    python -m gpt2lab.demo                  # what `make demo` runs
    python -m gpt2lab.demo --steps 50       # shorter

Steps: pick a corpus (Tiny Shakespeare, which ships with gpt2lab, or with --corpus pydoc the Python
documentation that ships with CPython, `pydoc_data.topics`), tokenize it into data/, train the
`configs/shakespeare-cpu.toml` model into runs/demo with the progress bar, print samples, write the
loss plot, and say where everything is and what to try next.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .config import load_train_config
from .errors import GPT2LabError
from .fileio import atomic_write_text

CONFIG_NAME = "shakespeare-cpu.toml"
PROMPTS = {"tinyshakespeare": ["ROMEO:", "JULIET:\nO"], "pydoc-topics": ["The with statement", "A class"]}


def find_config() -> Path:
    """configs/shakespeare-cpu.toml of this checkout (or of the current directory)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "configs" / CONFIG_NAME).is_file():
            return root / "configs" / CONFIG_NAME
    raise GPT2LabError(f"configs/{CONFIG_NAME} not found: run the demo from the gpt2lab repository (make demo)")


def choose_corpus(data_root: Path, corpus: str) -> tuple[str, str]:
    """(corpus name, `prepare` source): Tiny Shakespeare (bundled with gpt2lab), or the pydoc topics."""
    if corpus == "tinyshakespeare":
        return "tinyshakespeare", "tinyshakespeare"
    if corpus != "pydoc":
        raise GPT2LabError(f"unknown corpus {corpus!r}: use tinyshakespeare or pydoc")
    # Every CPython ships its documentation's topic pages (used by help()): about 0.5 MB of English.
    from pydoc_data.topics import topics

    path = data_root / "pydoc-topics.jsonl"
    atomic_write_text(path, "".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    return "pydoc-topics", str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt2lab.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    ap.add_argument("--out", default="runs/demo", help="run directory, replaced if it exists (default: runs/demo)")
    ap.add_argument("--data-root", default="data", help="where the tokenized corpus goes (default: data)")
    ap.add_argument(
        "--corpus",
        choices=["tinyshakespeare", "pydoc"],
        default="tinyshakespeare",
        help="Tiny Shakespeare (bundled, the default) or the Python documentation (pydoc_data.topics)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except GPT2LabError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from .data.prepare import PrepareOptions, prepare
    from .train.loop import train

    t_start = time.perf_counter()
    data_root, out = Path(args.data_root), Path(args.out)
    print("gpt2lab demo: a small GPT-2 learns a corpus on this CPU, offline.\n")
    name, source = choose_corpus(data_root, args.corpus)
    what = "Tiny Shakespeare (1 MB of plays)" if name == "tinyshakespeare" else "the Python documentation (pydoc)"
    print(f"corpus: {what}")
    data_dir = data_root / name
    prepared = prepare(PrepareOptions(source=source, out=data_dir, progress=not args.no_progress))
    splits = prepared.manifest["splits"]
    print(f"tokens: {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val in {data_dir}\n")

    overrides = [f"data.dir={data_dir}", f"train.out_dir={out}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    prompt = PROMPTS[name][0]
    overrides.append(f"eval.sample_prompt={json.dumps(prompt)}")
    cfg = load_train_config(find_config(), overrides)
    if out.exists():
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    m = cfg.model_config()
    print(
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {cfg.train.seq_len}; "
        f"{cfg.train.max_steps} steps of {cfg.train.total_batch_tokens:,} tokens\n"
    )
    result = train(cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - t_start

    from .checkpoint import load_model
    from .generate import SamplingParams, generate
    from .metrics import plot_runs
    from .tokenizer import get_tokenizer

    model, tok = load_model(out), get_tokenizer()
    print("\nsamples (temperature 0.8, top-k 200):")
    for i, text in enumerate(PROMPTS[name]):
        sampling = SamplingParams(temperature=0.8, top_k=200, seed=i, stop_token=tok.eot_token)
        gen = generate(model, tok.encode(text), 80, sampling=sampling)
        tokens = [t for t in gen.tokens[0] if t != tok.eot_token]
        print(f"---\n{text}{tok.decode(tokens)}")
    plot = plot_runs([out], out / "loss.png")
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "n/a"
    print(
        f"---\n\ndone in {elapsed / 60:.1f} min (data preparation + training): {result.step} steps, "
        f"val loss {val} nats per token on the {name} val split"
    )
    places = [
        (f"{data_dir}/", "the tokenized corpus (manifest.json + shards)"),
        (f"{out}/config.toml", "the resolved config"),
        (f"{out}/metrics.jsonl", "loss, lr, grad norm, tokens/s per step; val loss and samples"),
        (f"{out}/checkpoints/", "model and optimizer state (safetensors)"),
        (str(plot), "train / val loss plot"),
    ]
    width = max(len(p) for p, _ in places) + 2
    print("\nwhere things are:")
    for path, what in places:
        print(f"  {path.ljust(width)}{what}")
    print(
        "\nwhat to try next:\n"
        f"  .venv/bin/gpt2lab sample --model {out} --prompt {json.dumps(prompt)} --num-samples 3\n"
        f"  .venv/bin/gpt2lab train configs/{CONFIG_NAME} --data {data_dir} --max-steps 3000 --out runs/longer\n"
        f"  .venv/bin/gpt2lab train configs/finetune-gpt2-shakespeare.toml --data {data_dir}"
        "   # fine-tune OpenAI's GPT-2 (124M): downloads it once, best on a GPU\n"
        "  torchrun --standalone --nproc_per_node=8 -m gpt2lab train configs/gpt2-124M-fineweb-edu.toml"
        "   # the 124M recipe, on GPUs\n"
        "  README.md, section Training, says more"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
