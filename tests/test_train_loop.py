"""The training loop end to end on tiny models: exact resume, faults, fine-tuning, outputs, DDP."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import checkpoint as ckpt
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval import EvalContext
from gpt2lab.model import GPT
from gpt2lab.runtime import keep_freed_memory
from gpt2lab.train import checkpoint as train_checkpoint
from gpt2lab.train import train
from gpt2lab.train.config import to_toml

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(ckpt.checkpoint_dir(run_dir, step) / ckpt.WEIGHTS_FILE)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def child_env() -> dict[str, str]:
    return {**subprocess_env(), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_identical(corpus, tmp_path, optimizer):
    # Dropout and shuffling on, so the RNG states and the loader position must be restored exactly;
    # the runs evaluate (val loss and a sample) at different steps, which must not change training.
    sections = dict(
        model={"dropout": 0.1},
        data={"shuffle": True},
        eval={"every": 3, "sample_tokens": 4},
        optim={"name": optimizer},
    )
    straight = train(tiny_config(corpus, tmp_path / "straight", **sections), progress=False)
    assert straight.step == 8 and not straight.interrupted

    first = tiny_config(corpus, tmp_path / "resumed", **{**sections, "eval": {"every": 0}})
    part = train(first, stop_at=5, progress=False)
    assert part.step == 5 and part.interrupted and part.checkpoint.name == "step_00000005"
    second = tiny_config(corpus, tmp_path / "resumed", **{**sections, "eval": {"every": 2, "sample_tokens": 4}})
    rest = train(second, resume="auto", progress=False)
    assert rest.step == 8

    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")  # exactly, step by step
    assert_same_tensors(weights(tmp_path / "straight", 8), weights(tmp_path / "resumed", 8))
    opt = [
        load_file(ckpt.checkpoint_dir(tmp_path / r, 8) / train_checkpoint.OPTIMIZER_FILE)
        for r in ("straight", "resumed")
    ]
    assert_same_tensors(*opt)


@pytest.fixture
def fake_clock(monkeypatch):
    """The loop's clock, advanced by one second at every reading: time limits without waiting."""
    import gpt2lab.train.loop as loop

    now = iter(range(10**9))
    monkeypatch.setattr(loop, "_clock", lambda: float(next(now)))


def test_time_limit_ends_the_run_like_its_last_step_and_resume_continues_exactly(corpus, tmp_path, fake_clock):
    sections = dict(data={"shuffle": True}, eval={"every": 0, "sample_tokens": 4}, checkpoint={"every": 0})
    straight = train(tiny_config(corpus, tmp_path / "straight", **sections), progress=False)
    assert straight.step == 8

    # 0.2 min = 12 s. The clock is read 4 times per step (start, time check, end, elapsed), so a step
    # "takes" 2 s: step 3's check (10 s + 2 s) still fits, step 4's (14 s + 2 s) does not.
    limited = tiny_config(corpus, tmp_path / "resumed", train={"max_minutes": 0.2}, **sections)
    part = train(limited, progress=False)
    assert part.step == 4 and part.interrupted and part.checkpoint.name == "step_00000004"
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]  # evaluated as a last step is
    assert [r["step"] for r in records if r["kind"] == "sample"] == [4]
    events = [r["message"] for r in records if r["kind"] == "event"]
    memory = ["CPU memory: freed memory is kept for the next steps (glibc malloc without mmap)"]
    assert [e.split(":")[0] for e in events[:6]] == ["model", "device", "data", "steps", "eval", "run directory"]
    assert events[6:] == [
        *(memory if keep_freed_memory() else []),  # where the C library is glibc
        "float32 CPU loss: chunks of 256 tokens, exp2, vocab-major; the default (too small a shape to time)",
        f"train.max_minutes (0.2) reached: stopped after step 4 of 8, checkpoint {part.checkpoint}",
    ]

    rest = train(tiny_config(corpus, tmp_path / "resumed", **sections), resume="auto", progress=False)
    assert rest.step == 8 and not rest.interrupted
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert_same_tensors(weights(tmp_path / "straight", 8), weights(tmp_path / "resumed", 8))


def test_a_step_always_runs_even_when_the_time_limit_has_passed(corpus, tmp_path, fake_clock):
    # 0.01 min = 0.6 s: gone before the first step's check, which still lets that step finish.
    result = train(tiny_config(corpus, tmp_path / "run", train={"max_minutes": 0.01}), progress=False)
    assert result.step == 1 and result.interrupted and result.checkpoint.name == "step_00000001"


def test_cli_max_minutes_sets_the_limit(corpus, tmp_path, cli):
    config = write_toml(tiny_config(corpus, tmp_path / "run"), tmp_path / "tiny.toml")
    printed = cli("train", config, "--max-minutes", "30", "--print-config")
    assert printed.code == 0 and "max_minutes = 30.0" in printed.out
    bad = cli("train", config, "--max-minutes", "-2", "--no-progress")
    assert bad.code == 1 and "train.max_minutes must be >= 0" in bad.err and "Traceback" not in bad.err


def test_resume_auto_without_checkpoint_starts_fresh_and_never_refuses_existing(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"max_steps": 2})
    assert train(cfg, resume="auto", progress=False).step == 2
    with pytest.raises(GPT2LabError, match="already has checkpoints.*--resume auto"):
        train(cfg, progress=False)
    again = train(cfg, resume="auto", progress=False)  # already at max_steps: nothing to do
    assert again.step == 2 and len(train_losses(tmp_path / "run")) == 2


def write_toml(cfg, path: Path) -> Path:
    path.write_text(to_toml(cfg))
    return path


@pytest.fixture
def nan_at_step(monkeypatch):
    """Make the training loss NaN on the micro-steps of the given optimizer steps (2 micro-steps each)."""
    original = GPT.forward

    def inject(steps: set[int], grad_accum: int = 2):
        calls = {"n": 0}

        def forward(self, idx, targets=None, *args, **kwargs):
            logits, loss = original(self, idx, targets, *args, **kwargs)
            if targets is not None and torch.is_grad_enabled():
                calls["n"] += 1
                if (calls["n"] - 1) // grad_accum + 1 in steps:
                    loss = loss * float("nan")
            return logits, loss

        monkeypatch.setattr(GPT, "forward", forward)
        # The fused loss gives the trainer's model a forward of its own (accel.use_fused_loss): train on
        # the plain forward, the one patched here.
        monkeypatch.setenv("GPT2LAB_ACCEL", "0")

    return inject


def test_nan_loss_stops_and_keeps_last_checkpoint(corpus, tmp_path, cli, nan_at_step):
    run = tmp_path / "run"
    config = write_toml(tiny_config(corpus, run, checkpoint={"every": 2}), tmp_path / "tiny.toml")
    nan_at_step({5})
    result = cli("train", config, "--no-progress")
    assert result.code == 1
    assert "non-finite loss (nan) at step 5: training stopped" in result.err
    assert "last good checkpoint is" in result.err and "step_00000004" in result.err
    assert [p.name for p in ckpt.find_checkpoints(run)] == ["step_00000002", "step_00000004"]
    _, states = train_checkpoint.load_training_checkpoint(train_checkpoint.find_latest_training(run))
    assert states["counters"]["step"] == 4 and all(torch.isfinite(t).all() for t in states["model"].values())


def test_skip_nonfinite_steps_over_bad_batches(corpus, tmp_path, nan_at_step):
    nan_at_step({3})
    result = train(tiny_config(corpus, tmp_path / "run", train={"skip_nonfinite": 1}), progress=False)
    assert result.step == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "event" and "update skipped (1 of 1 allowed)" in r["message"] for r in records)


def test_failed_checkpoint_write_is_an_error_and_keeps_the_previous(corpus, tmp_path, monkeypatch):
    from gpt2lab import fileio

    real = fileio.atomic_save_safetensors
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(path, *args, **kwargs):
        if Path(path).name == train_checkpoint.OPTIMIZER_FILE:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(train_checkpoint, "atomic_save_safetensors", disk_full_on_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(GPT2LabError, match=r"could not write checkpoint .*step_00000008: No space left on device"):
        train(tiny_config(corpus, run), progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]  # no half-written leftovers
    assert ckpt.load_model(run).config.n_layer == 2
    assert train_checkpoint.load_training_checkpoint(run / "checkpoints" / "step_00000004")[1]["counters"]["step"] == 4


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import gpt2lab.train.checkpoint as train_checkpoint
from gpt2lab.train.config import load_train_config
from gpt2lab.train import train

real = train_checkpoint.write_model_files

def stall_second_checkpoint(folder, *args, **kwargs):
    if "step_00000008" in Path(folder).name:  # optimizer + trainer state written, weights not yet
        Path(sys.argv[2]).write_text("writing")
        time.sleep(120)
    return real(folder, *args, **kwargs)

train_checkpoint.write_model_files = stall_second_checkpoint
train(load_train_config(sys.argv[1]), progress=False)
"""


@pytest.mark.subprocess
def test_kill_9_during_checkpoint_write_loses_nothing_before_it(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run)
    marker = tmp_path / "writing"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(write_toml(cfg, tmp_path / "tiny.toml")), str(marker)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stdout.read().decode() if child.poll() is not None else "timed out"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert [p.name for p in ckpt.find_checkpoints(run)] == ["step_00000004"]
    assert any(p.name.startswith(".step_00000008.tmp-") for p in (run / "checkpoints").iterdir())
    assert ckpt.load_model(run).config.n_embd == 32  # the newest complete checkpoint loads

    resumed = train(cfg, resume="auto", progress=False)  # picks up at step 4 and cleans the leftover
    assert resumed.step == 8
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())
    train(tiny_config(corpus, tmp_path / "straight"), progress=False)
    assert_same_tensors(weights(run, 8), weights(tmp_path / "straight", 8))
    assert train_losses(run) == train_losses(tmp_path / "straight")


@pytest.mark.subprocess
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run, train={"max_steps": 100000}, checkpoint={"every": 0})
    child = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "train", str(write_toml(cfg, tmp_path / "t.toml")), "--no-progress"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "SIGTERM received: stopped after step" in out and "stopped at step" in out
    latest = train_checkpoint.find_latest_training(run)
    step = train_checkpoint.load_training_checkpoint(latest)[1]["counters"]["step"]
    assert 3 <= step < 100000 and latest.name == f"step_{step:08d}"
    assert len(train_losses(run)) == step


def test_checkpoint_is_a_model_for_sample_eval_and_convert(corpus, tmp_path, cli):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"max_steps": 2}), progress=False)
    latest = ckpt.find_latest(run)
    result = cli("sample", "--model", latest, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--device", "cpu")
    assert result.code == 0 and result.out.startswith("ROMEO:")
    assert cli("sample", "--model", run, "--max-new-tokens", "3", "--device", "cpu").code == 0  # the run dir too
    args = ["--task", "val-loss", "--data", corpus, "--seq-len", "16", "--max-tokens", "256", "--no-progress"]
    result = cli("eval", "--model", run, *args, "--json", tmp_path / "eval.json")
    assert result.code == 0, result.err
    measured = json.loads((tmp_path / "eval.json").read_text())["results"]["loss"]
    final_val = ckpt.read_meta(latest)["training"]["val_loss"]  # what the run measured at its last step
    assert measured == pytest.approx(final_val, abs=1e-6)
    result = cli("convert", "--to-hf", latest, "--out", tmp_path / "hf")
    assert result.code == 0, result.err
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = ckpt.load_model(latest)
    idx = torch.randint(0, 50257, (1, 12))
    torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)


def val_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def test_finetune_from_a_checkpoint_and_from_hugging_face(corpus, tmp_path):
    from helpers import hf_gpt2

    base = tmp_path / "base"
    train(tiny_config(corpus, base, eval={"every": 4}), progress=False)
    tuned = tmp_path / "tuned"
    cfg = tiny_config(corpus, tuned, shape=False, train={"init_from": str(base), "max_steps": 2}, eval={"every": 2})
    train(cfg, progress=False)
    assert val_losses(tuned)[0] == val_losses(base)[8]  # starts from exactly the base weights
    states = train_checkpoint.load_training_checkpoint(train_checkpoint.find_latest_training(tuned))[1]
    assert states["counters"]["step"] == states["schedule"]["step"] == 2  # a fresh optimizer and schedule

    hf_dir = tmp_path / "hf"
    hf_gpt2(seed=3, n_positions=32).save_pretrained(hf_dir)
    from gpt2lab.eval.val_loss import val_loss

    expected = val_loss(ckpt.load_model(hf_dir), corpus, EvalContext(batch_size=4), max_tokens=256, seq_len=16).loss
    from_hf = tmp_path / "from_hf"
    cfg = tiny_config(corpus, from_hf, shape=False, train={"init_from": str(hf_dir), "max_steps": 1}, eval={"every": 1})
    train(cfg, progress=False)
    assert val_losses(from_hf)[0] == pytest.approx(expected, abs=1e-5)
    meta = ckpt.read_meta(ckpt.find_latest(from_hf))
    assert meta["model"]["block_size"] == 32
    assert meta["model"]["pad_vocab_multiple"] == 64  # padded for speed, whatever the source


def test_finetune_rejects_explicit_sizes(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "x", train={"init_from": "gpt2"}, model={"n_layer": 2})
    with pytest.raises(GPT2LabError, match="model.n_layer cannot be set together with train.init_from"):
        train(cfg, progress=False)


def test_eval_hook_metrics_and_plot(corpus, tmp_path, cli):
    def my_task(model, ctx):
        return {"my_accuracy": ctx.step / 10}

    for name in ("a", "b"):
        cfg = tiny_config(corpus, tmp_path / name, eval={"every": 4, "sample_tokens": 3, "sample_prompt": "KING"})
        train(cfg, eval_tasks=[my_task], progress=False)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["my_accuracy"] == 0.8
    assert all(r["val_loss"] > 0 for r in evals)
    assert [r["step"] for r in records if r["kind"] == "sample"] == [4, 8]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "mfu", "step_time"} <= train_recs[0].keys()
    assert (tmp_path / "a" / "config.toml").is_file()

    assert cli("plot", tmp_path / "a").code == 0
    assert (tmp_path / "a" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cli("plot", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "cmp.png", "--x", "tokens")
    assert result.code == 0 and (tmp_path / "cmp.png").stat().st_size > 1000
    assert cli("plot", tmp_path / "nothing").code == 1


def test_hellaswag_during_training_and_its_reference_lines(corpus, tmp_path, offline_env, cli):
    from eval_data import write_items

    from gpt2lab.eval.hellaswag import CACHE_NAME

    (offline_env / "gpt2lab").mkdir(parents=True, exist_ok=True)
    write_items(offline_env / "gpt2lab" / CACHE_NAME)  # stands in for the downloaded validation set
    run = tmp_path / "run"
    sections = dict(model={"block_size": 96}, train={"max_steps": 4}, eval={"every": 2, "tasks": ["hellaswag"]})
    train(tiny_config(corpus, run, **sections), progress=False)  # block_size 96: room for the items
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["hellaswag_acc_norm"] <= 1.0 and r["hellaswag_items"] > 0 for r in evals)
    assert cli("plot", run).code == 0 and (run / "loss.png").is_file()
    with pytest.raises(GPT2LabError, match="eval.tasks: unknown task 'mmlu'"):
        train(tiny_config(corpus, tmp_path / "x", eval={"tasks": ["mmlu"]}), progress=False)


def test_tensorboard_logs_or_a_clear_error(corpus, tmp_path):
    import importlib.util

    cfg = tiny_config(corpus, tmp_path / "run", train={"max_steps": 2, "tensorboard": True})
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(GPT2LabError, match="pip install tensorboard"):
            train(cfg, progress=False)
    else:
        train(cfg, progress=False)
        assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.subprocess
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_on_two_processes_equals_gradient_accumulation(corpus, tmp_path, optimizer):
    # 2 ranks x 1 micro-batch of 4 sequences vs 1 rank x 2 micro-steps: the same 8 sequences per step.
    sections = dict(train={"max_steps": 5}, eval={"every": 5}, optim={"name": optimizer})
    single = train(tiny_config(corpus, tmp_path / "one", **sections), progress=False)
    config = write_toml(tiny_config(corpus, tmp_path / "two", **sections), tmp_path / "ddp.toml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*cmd, "-m", "gpt2lab", "train", str(config), "--no-progress"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = ckpt.read_meta(ckpt.find_latest(tmp_path / "two"))
    assert meta["training"]["world_size"] == 2 and meta["training"]["grad_accum"] == 1
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)
    wa, wb = weights(tmp_path / "one", 5), weights(tmp_path / "two", 5)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    va, vb = val_losses(tmp_path / "one"), val_losses(tmp_path / "two")
    assert va[5] == pytest.approx(vb[5], abs=1e-5)  # the same val windows on 1 rank and on 2
    assert single.step == 5
