"""`make demo`: train a small GPT-2 on this CPU in a few minutes, offline, and show what it learned.

    python -m gpt2lab.demo                  # what `make demo` runs: 5 minutes in all
    python -m gpt2lab.demo --minutes 10     # a longer budget, a lower loss
    python -m gpt2lab.demo --steps 50       # a fixed number of steps, no time limit

Steps: prepare a corpus (Tiny Shakespeare, bundled, or the Python documentation CPython ships); train the
`configs/shakespeare-cpu.toml` model under a time limit; print samples; plot the losses; say what next.

The time limit is what the budget leaves after the data and RESERVE_SECONDS. The trainer ends the run at
it (train.max_minutes) and paces the learning-rate schedule by it (optim.fit_schedule_to_time), so on
any CPU the rate has decayed to its floor when time is up; a fast one ends at the config's tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .errors import GPT2LabError
from .fileio import atomic_write_text
from .openmp import spin_briefly_before_torch
from .train.config import TrainConfig, load_train_config

CONFIG_NAME = "shakespeare-cpu.toml"
# The config's 1.23M tokens in steps of 512 instead of 1,024, which learn more per token in a run that
# time cuts short (docs/performance.md, "The demo"); the config's share of warm-up; one evaluation and
# one checkpoint, at the end (a mid-run evaluation just before the time limit would overrun it).
STEPS, WARMUP_SHARE = 2400, 12
DEMO_RUN = ("train.batch_size=4", "train.total_batch_tokens=512", "eval.every=0", "checkpoint.every=0")
# The budget outside training: building the model, the last evaluation and checkpoint, the samples, the
# plot and the exit (docs/performance.md, "The demo").
RESERVE_SECONDS = 25.0
PROMPTS = {"tinyshakespeare": ["ROMEO:", "JULIET:\nO"], "pydoc-topics": ["The with statement", "A class"]}


def main(argv: list[str] | None = None) -> int:
    """The demo, its budget counted from now (the interpreter starts in a fraction of a second)."""
    ap = argparse.ArgumentParser(prog="python -m gpt2lab.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of the whole demo (default: 5)")
    ap.add_argument("--steps", type=int, help="a fixed number of optimizer steps instead of a time limit")
    ap.add_argument("--out", default="runs/demo", help="run directory, replaced if it exists (default: runs/demo)")
    ap.add_argument("--data-root", default="data", help="where the tokenized corpus goes (default: data)")
    ap.add_argument("--corpus", choices=["tinyshakespeare", "pydoc"], default="tinyshakespeare")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not args.minutes > 0:
        ap.error(f"--minutes must be positive, got {args.minutes:g}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    t_start = time.perf_counter()
    spin_briefly_before_torch()  # as `gpt2lab train` does, before torch loads
    try:
        from .train.loop import train

        print("gpt2lab demo: a small GPT-2 learns a corpus on this CPU, offline.\n")
        data_dir = prepare_corpus(Path(args.data_root), args.corpus, not args.no_progress)
        cfg = configure(args, data_dir, args.minutes * 60 - (time.perf_counter() - t_start) - RESERVE_SECONDS)
        t_train = time.perf_counter()
        result = train(cfg, progress=not args.no_progress)
        t_trained = time.perf_counter()
        plot = sample_and_plot(Path(args.out), PROMPTS[data_dir.name])
    except GPT2LabError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t_start
    budget = f" of a {args.minutes:g}-minute budget" if cfg.train.max_minutes else ""
    cut = " (the time limit ended the run)" if result.interrupted else ""
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "n/a"
    print(
        f"---\n\ndone in {elapsed / 60:.1f} min{budget} (data preparation + training): {result.step} steps{cut}, "
        f"val loss {val} nats per token on the {data_dir.name} val split\ntime: {t_train - t_start:.0f} s "
        f"start-up and data, {t_trained - t_train:.0f} s training (evaluations included), "
        f"{elapsed - (t_trained - t_start):.0f} s samples and plot"
    )
    tell_next(data_dir, Path(args.out), plot)
    return 0


def prepare_corpus(data_root: Path, corpus: str, progress: bool) -> Path:
    """Tokenize Tiny Shakespeare (bundled with gpt2lab) or the pydoc topics into data_root; their directory."""
    from .data.prepare import PrepareOptions, prepare

    name, source = "tinyshakespeare", "tinyshakespeare"
    if corpus == "pydoc":  # every CPython ships its documentation's topic pages (help()): 0.5 MB of English
        from pydoc_data.topics import topics

        name, source = "pydoc-topics", str(data_root / "pydoc-topics.jsonl")
        atomic_write_text(Path(source), "".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    print(f"corpus: {'Tiny Shakespeare (1 MB of plays)' if corpus != 'pydoc' else 'the Python documentation'}")
    splits = prepare(PrepareOptions(source=source, out=data_root / name, progress=progress)).manifest["splits"]
    print(f"tokens: {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val in {data_root / name}\n")
    return data_root / name


def configure(args: argparse.Namespace, data_dir: Path, seconds_left: float) -> TrainConfig:
    """The config's model as the demo trains it (DEMO_RUN): under a time limit of `seconds_left`, or for
    --steps; the user's --set last. Replaces the previous demo run."""
    steps = args.steps or STEPS
    prompt = json.dumps(PROMPTS[data_dir.name][0])
    overrides = [f"data.dir={data_dir}", f"train.out_dir={args.out}", f"eval.sample_prompt={prompt}", *DEMO_RUN]
    overrides += [f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // WARMUP_SHARE)}"]
    if args.steps is None:
        overrides += [f"train.max_minutes={max(seconds_left, 1.0) / 60}", "optim.fit_schedule_to_time=true"]
    cfg = load_train_config(find_config(), overrides + args.overrides)
    if Path(args.out).exists():
        print(f"replacing the previous demo run in {args.out}")
        shutil.rmtree(args.out)
    m, t, o = cfg.model_config(), cfg.train, cfg.optim
    print(
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {t.seq_len}; up to {t.max_steps} "
        f"steps of {t.total_batch_tokens:,} tokens, learning rate {o.lr:g} decaying to {o.min_lr:g}"
    )
    if t.max_minutes:
        print(
            f"time limit: {t.max_minutes:.1f} min of training, the {args.minutes:g}-minute budget less the data and "
            f"{RESERVE_SECONDS:.0f} s for evaluation, samples and plot; the learning rate reaches {o.min_lr:g} by then"
        )
    print()
    return cfg


def find_config() -> Path:
    """configs/shakespeare-cpu.toml of this checkout (or of the current directory)."""
    for path in (Path(__file__).resolve().parents[2] / "configs" / CONFIG_NAME, Path.cwd() / "configs" / CONFIG_NAME):
        if path.is_file():
            return path
    raise GPT2LabError(f"configs/{CONFIG_NAME} not found: run the demo from the gpt2lab repository (make demo)")


def sample_and_plot(out: Path, prompts: list[str]) -> Path:
    """Print a sample of the trained model for each prompt; write the loss plot, returning its path."""
    from .checkpoint import load_model
    from .generate import SamplingParams, generate
    from .metrics import plot_runs
    from .tokenizer import get_tokenizer

    model, tok = load_model(out), get_tokenizer()
    print("\nsamples (temperature 0.8, top-k 200):")
    for i, text in enumerate(prompts):
        sampling = SamplingParams(temperature=0.8, top_k=200, seed=i, stop_token=tok.eot_token)
        gen = generate(model, tok.encode(text), 80, sampling=sampling)
        print(f"---\n{text}{tok.decode([t for t in gen.tokens[0] if t != tok.eot_token])}")
    return plot_runs([out], out / "loss.png")


def tell_next(data_dir: Path, out: Path, plot: Path) -> None:
    """Where the demo's files are, and what to run next."""
    places = {
        f"{data_dir}/": "the tokenized corpus (manifest.json + shards)",
        f"{out}/config.toml": "the resolved config",
        f"{out}/metrics.jsonl": "loss, lr, grad norm, tokens/s per step; val loss and samples",
        f"{out}/checkpoints/": "model and optimizer state (safetensors)",
        str(plot): "train / val loss plot",
    }
    width = max(map(len, places)) + 2
    print("\nwhere things are:\n" + "\n".join(f"  {path.ljust(width)}{what}" for path, what in places.items()))
    print(
        "\nwhat to try next:\n"
        f"  .venv/bin/gpt2lab sample --model {out} --prompt {json.dumps(PROMPTS[data_dir.name][0])} --num-samples 3\n"
        f"  .venv/bin/gpt2lab train configs/{CONFIG_NAME} --data {data_dir} --max-steps 3000 --out runs/longer\n"
        f"  .venv/bin/gpt2lab train configs/finetune-gpt2-shakespeare.toml --data {data_dir}"
        "   # fine-tune OpenAI's GPT-2 (124M): downloads it once, best on a GPU\n"
        "  torchrun --standalone --nproc_per_node=8 -m gpt2lab train configs/gpt2-124M-fineweb-edu.toml"
        "   # the 124M recipe, on GPUs\n"
        "  README.md, section Training, says more"
    )


if __name__ == "__main__":
    raise SystemExit(main())
