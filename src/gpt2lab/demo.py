"""`make demo`: train a small GPT-2 on this CPU in a few minutes, offline, and show what it learned.

    python -m gpt2lab.demo                  # what `make demo` runs: 5 minutes in all
    python -m gpt2lab.demo --minutes 10     # a longer budget, a lower loss
    python -m gpt2lab.demo --steps 50       # a fixed number of steps, no timing

Steps: pick a corpus (Tiny Shakespeare, which ships with gpt2lab, or with --corpus pydoc the Python
documentation that ships with CPython, `pydoc_data.topics`), tokenize it into data/, time a few training
steps of the `configs/shakespeare-cpu.toml` model on this machine and fit the run to the budget, train it
into runs/demo with the progress bar, print samples, write the loss plot, and say where everything is
and what to try next.

Fitting the run to the budget: a step costs what this CPU makes of it (float32 on an AVX2 CPU is about
three times slower than bf16 on one with AVX-512 and bf16 instructions), so the demo times a few steps
first (CALIBRATION_STEPS), then fixes the number of steps and the schedule so that the whole demo ends
within --minutes, and prints what it chose and why. Where the config's 1200 steps fit, it trains them as
they are. Where they don't, it trains a short run: half the config's tokens per step (SHORT_RUN), as many
steps as fit, the same peak learning rates, the warm-up the same share of the run. For the same tokens,
more and smaller steps reached a lower val loss (5.22 against 5.35 at 461K tokens with AdamW; 4.58
against 4.65 at 491K with the config's Muon; docs/performance.md, "The demo" and "Muon"). Timings on a
shared machine are only estimates, so training also gets a time limit (train.max_minutes): if its steps
run slower than the timed ones, the run ends early, evaluated and checkpointed, and the demo still ends
within the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import GPT2LabError
from .fileio import atomic_write_text
from .train.config import load_train_config

if TYPE_CHECKING:
    from .train.config import TrainConfig

CONFIG_NAME = "shakespeare-cpu.toml"
DEFAULT_MINUTES = 5.0
CALIBRATION_STEPS = 12  # the first 4 warm up (allocations, oneDNN's kernel choice) and are not counted;
# the median of the other 8 (a single step on a shared 2-core VM varied from 0.26 to 0.44 s)
CALIBRATION_WARMUP = 4
# What the demo needs beyond its steps: two evaluations and checkpoints, the samples and the plot
# (in float32 on 2-core CPUs with AVX2 kernels, 25 s in all on an AMD EPYC, where an evaluation took
# 11 s, and 17 s on an Intel Xeon). Where it is more, the time limit takes it from the last steps.
RESERVE_SECONDS = 25.0
# Of those, what comes after the last step (the final evaluation and checkpoint, the samples, the plot,
# the interpreter's exit: 14 s there): training is given a time limit (train.max_minutes) that leaves
# this much of the budget. With 15 s, a run that the limit ended took 5:00.2.
TAIL_SECONDS = 20.0
MIN_STEPS = 50
# A step of the config's run costs about 1.85 times a short run's (546 against 296 ms in float32 on
# AVX2 kernels): the config's steps are timed only where that estimate leaves them a chance to fit.
FULL_OVER_SHORT = 1.7
# A short run's steps: 4 x 128 tokens instead of the config's 8 x 128 (docs/performance.md, "The demo").
SHORT_RUN = ("train.batch_size=4", "train.total_batch_tokens=512")
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


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The demo; its budget counts from `started` (a time.perf_counter() reading), by default now.
    `python -m gpt2lab.demo` passes the process's start, so the interpreter's start-up counts too."""
    ap = argparse.ArgumentParser(prog="python -m gpt2lab.demo", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"wall-time budget for the whole demo; the steps are fitted to it (default: {DEFAULT_MINUTES:g})",
    )
    ap.add_argument("--steps", type=int, help="a fixed number of optimizer steps instead of fitting to --minutes")
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
    if not args.minutes > 0:
        ap.error(f"--minutes must be positive, got {args.minutes:g}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    try:
        return _run(args, time.perf_counter() if started is None else started)
    except GPT2LabError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, t_start: float) -> int:
    from .data.prepare import PrepareOptions, prepare
    from .train.loop import train

    data_root, out = Path(args.data_root), Path(args.out)
    print("gpt2lab demo: a small GPT-2 learns a corpus on this CPU, offline.\n")
    name, source = choose_corpus(data_root, args.corpus)
    what = "Tiny Shakespeare (1 MB of plays)" if name == "tinyshakespeare" else "the Python documentation (pydoc)"
    print(f"corpus: {what}")
    data_dir = data_root / name
    prepared = prepare(PrepareOptions(source=source, out=data_dir, progress=not args.no_progress))
    splits = prepared.manifest["splits"]
    print(f"tokens: {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val in {data_dir}\n")

    prompt = PROMPTS[name][0]
    overrides = [f"data.dir={data_dir}", f"train.out_dir={out}", f"eval.sample_prompt={json.dumps(prompt)}"]
    overrides += args.overrides
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_train_config(find_config(), overrides)
    if args.steps is None:
        plan = plan_run(cfg, overrides, args.minutes * 60, t_start, out.parent)
        print(plan.explain(cfg) + "\n")
        cfg = load_train_config(find_config(), overrides + plan.overrides())
    if out.exists():
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    m = cfg.model_config()
    print(
        f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {cfg.train.seq_len}; "
        f"{cfg.train.max_steps} steps of {cfg.train.total_batch_tokens:,} tokens\n"
    )
    if args.steps is None:  # the budget is kept even when the steps run slower than the timed ones
        left = args.minutes * 60 - (time.perf_counter() - t_start) - TAIL_SECONDS
        cfg = cfg.with_overrides({"train.max_minutes": max(left, 1.0) / 60}, source="the demo's budget")
    t_train = time.perf_counter()
    result = train(cfg, progress=not args.no_progress)
    t_trained = time.perf_counter()

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
    elapsed = time.perf_counter() - t_start
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "n/a"
    budget = f" of a {args.minutes:g}-minute budget" if args.steps is None else ""
    cut = f" of {cfg.train.max_steps} (the time limit ended the run early)" if result.interrupted else ""
    print(
        f"---\n\ndone in {elapsed / 60:.1f} min{budget} (data preparation + training): {result.step} steps{cut}, "
        f"val loss {val} nats per token on the {name} val split"
    )
    print(
        f"time: {t_train - t_start:.0f} s start-up, data and planning, {t_trained - t_train:.0f} s training "
        f"(evaluations included), {elapsed - (t_trained - t_start):.0f} s samples and plot"
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


@dataclass(frozen=True)
class Plan:
    """How many steps fit, and the schedule that goes with them."""

    step_time: float  # seconds per optimizer step on this machine, measured
    budget: float  # seconds for the whole demo
    spent: float  # seconds already gone (preparation, timing)
    steps: int
    warmup_steps: int
    tokens_per_step: int
    short: bool  # the config's steps did not fit: a short run (SHORT_RUN)

    def overrides(self) -> list[str]:
        every = max(1, (self.steps + 1) // 2)  # two evaluations: one mid-way for the plot, and the last
        return [
            *(SHORT_RUN if self.short else ()),
            f"train.max_steps={self.steps}",
            f"optim.warmup_steps={self.warmup_steps}",
            f"eval.every={every}",
            f"checkpoint.every={every}",
        ]

    def explain(self, cfg: TrainConfig) -> str:
        """What was measured and chosen, for the person waiting; `cfg` is the config as it was asked for."""
        import torch

        from .runtime import autocast_dtype, cpu_has_fast_bf16, resolve_device

        device = resolve_device(cfg.train.device)
        dtype = autocast_dtype(cfg.train.precision, device)
        if device.type == "cpu":
            isa = torch.backends.cpu.get_cpu_capability()
            where = f"this CPU ({isa} kernels, {'with' if cpu_has_fast_bf16() else 'no'} bf16 instructions)"
        else:
            where = f"this {device.type} device"
        precision = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "float16 autocast"}[dtype]
        left = max(0.0, self.budget - self.spent - RESERVE_SECONDS)
        minutes = self.steps * self.step_time / 60  # the plan's estimate of the training time
        lines = [
            f"budget: {self.budget / 60:g} min in all; {self.spent:.0f} s went to starting, preparing the data "
            f"and timing steps: {self.step_time * 1000:.0f} ms per step of {self.tokens_per_step} tokens on {where}, "
            f"{precision}"
        ]
        o = cfg.optim
        schedule = f"warm-up {self.warmup_steps} steps, learning rate {o.lr:g} decaying to {o.min_lr:g}"
        if o.name == "muon":
            schedule += f" (AdamW; the blocks' matrices: Muon at {o.muon_lr:g}, scaled alike)"
        if self.short:
            lines.append(
                f"plan: the config's {cfg.train.max_steps} steps do not fit in the {left / 60:.1f} min left after "
                f"{RESERVE_SECONDS:.0f} s kept for evaluation, samples and the plot; a short run instead: "
                f"{self.steps} steps ({minutes:.1f} min) of {self.tokens_per_step} tokens, {schedule} at step "
                f"{self.steps}"
            )
        else:
            lines.append(
                f"plan: the config's {self.steps} steps ({minutes:.1f} min) fit in the {left / 60:.1f} min left; "
                f"its schedule as it is ({schedule})"
            )
        return "\n".join(lines)


def process_age() -> float:
    """Seconds since this process started, from Linux's /proc (0 elsewhere): the interpreter's start and
    the imports before main() ran, a few seconds of the budget."""
    try:
        # Field 22 of /proc/self/stat, in clock ticks since boot; fields after the ")" of the name
        # start at field 3.
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def time_steps(cfg: TrainConfig, scratch_parent: Path) -> float:
    """Seconds per optimizer step of `cfg` on this machine: the median of the steps after
    CALIBRATION_WARMUP of a throwaway run (no evaluation) whose directory is removed."""
    import dataclasses
    import tempfile

    from .metrics import read_metrics
    from .train.loop import train

    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".demo-timing-", dir=scratch_parent) as tmp:
        t = dataclasses.replace(cfg.train, out_dir=tmp, max_steps=CALIBRATION_STEPS, log_every=1)
        ev = dataclasses.replace(cfg.eval, every=0, val_tokens=0, sample_tokens=0, tasks=[])
        ck = dataclasses.replace(cfg.checkpoint, every=0)
        train(dataclasses.replace(cfg, train=t, eval=ev, checkpoint=ck), progress=False)
        times = [r["step_time"] for r in read_metrics(tmp) if r.get("kind") == "train"]
    timed = sorted(times[CALIBRATION_WARMUP:])
    if not timed:
        raise GPT2LabError("timing the training steps recorded no step times")
    return timed[len(timed) // 2]


def plan_run(cfg: TrainConfig, overrides: list[str], budget: float, t_start: float, scratch: Path) -> Plan:
    """Time a short run's steps; where the config's steps might fit (FULL_OVER_SHORT), time those too,
    and train the config's run if they do; else fit the short run to the budget."""
    short = load_train_config(find_config(), [*overrides, *SHORT_RUN])
    short_time = time_steps(short, scratch)
    estimate = fit_to_budget(cfg, FULL_OVER_SHORT * short_time, budget, time.perf_counter() - t_start)
    if not estimate.short:
        plan = fit_to_budget(cfg, time_steps(cfg, scratch), budget, time.perf_counter() - t_start)
        if not plan.short:
            return plan
    return fit_to_budget(cfg, short_time, budget, time.perf_counter() - t_start, short=short)


def fit_to_budget(
    cfg: TrainConfig, step_time: float, budget: float, spent: float, short: TrainConfig | None = None
) -> Plan:
    """The plan for `budget` seconds, `spent` of them gone, at `step_time` seconds per step.

    Without `short`: the config's run if all its steps fit, else a Plan marked short (to be timed with
    SHORT_RUN's steps). With `short` (the config with SHORT_RUN applied, whose steps took `step_time`):
    as many of its steps as fit, at least MIN_STEPS (and a note that it will take longer), with the
    config's warm-up share.
    """
    left = budget - spent - RESERVE_SECONDS
    # All of the time left, at the timed step time: with freed memory kept (runtime.keep_freed_memory)
    # the timed steps cost what a run's later ones do (265 against 267 ms on an AMD EPYC with AVX2
    # kernels; while malloc unmapped freed memory, the first steps were 6-14% slower). Where the steps
    # are slower, the time limit (train.max_minutes) keeps the budget by ending the run a little before
    # its schedule does, at a learning rate near min_lr.
    fit = int(left / step_time) if left > 0 else 0
    o, t = cfg.optim, cfg.train
    if short is None:
        return Plan(step_time, budget, spent, t.max_steps, o.warmup_steps, t.total_batch_tokens, fit < t.max_steps)
    same_tokens = t.max_steps * t.total_batch_tokens // short.train.total_batch_tokens
    steps = min(max(MIN_STEPS, fit), same_tokens)
    if steps > fit:
        print(
            f"note: only {fit} steps fit in {budget / 60:g} min on this machine; planning {steps}, which the "
            "time limit will cut short (raise --minutes)"
        )
    warmup = min(steps, max(1, round(o.warmup_steps * steps / t.max_steps)))
    return Plan(step_time, budget, spent, steps, warmup, short.train.total_batch_tokens, True)


if __name__ == "__main__":
    raise SystemExit(main(started=time.perf_counter() - process_age()))
