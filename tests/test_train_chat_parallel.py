"""The chat loss (train.loss = "assistant") with everything training has: DDP and FSDP on 2 gloo ranks equal
to gradient accumulation in one process, torch.compile, and a run killed with SIGKILL resumed bit for
bit. The step's loss is the mean over its learned targets whatever the ranks and micro-batches hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chat_data import sum_conversations, write_chat_data
from helpers import subprocess_env
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import checkpoint as ckpt
from gpt2lab.train import train
from gpt2lab.train.config import to_toml

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # float32: 2 ranks reduce in another order than 1 process accumulates


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat") / "data"
    return write_chat_data(root, sum_conversations(400, seed=1), sum_conversations(60, seed=2))


def chat_config(data_dir: Path, out: Path, **sections: dict):
    """4 micro-batches of 4 rows of 32 tokens per step on one rank (2 on each of 2 ranks)."""
    base = {
        "train": {"loss": "assistant", "seq_len": 32, "total_batch_tokens": 512, "max_steps": 6},
        "data": {"shuffle": True},
        "eval": {"every": 3, "val_tokens": 512, "sample_tokens": 0},
        "checkpoint": {"every": 3},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return tiny_config(data_dir, out, **base)


def torchrun(config: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*cmd, "-m", "gpt2lab", "train", str(config), "--no-progress", *args],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_same_run(a: Path, b: Path, step: int, tol: float = TOL) -> None:
    """Losses, val losses and weights of two runs agree within `tol`."""
    la, lb = train_losses(a), train_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (s, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, abs=tol), s
    # The gradient norm too: AdamW would hide gradients scaled by a constant (by the number of ranks, say).
    for ra, rb in zip(records(a, "train"), records(b, "train")):
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3)
    va, vb = records(a, "eval"), records(b, "eval")
    assert [(r["step"], r["val_tokens"]) for r in va] == [(r["step"], r["val_tokens"]) for r in vb]
    for ra, rb in zip(va, vb):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=tol)
    wa, wb = (load_file(ckpt.checkpoint_dir(r, step) / ckpt.WEIGHTS_FILE) for r in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=tol)


@pytest.mark.subprocess
def test_ddp_on_two_ranks_equals_accumulation_in_one_process(chat_dir, tmp_path):
    train(chat_config(chat_dir, tmp_path / "one"), progress=False)
    (tmp_path / "ddp.toml").write_text(to_toml(chat_config(chat_dir, tmp_path / "two")))
    out = torchrun(tmp_path / "ddp.toml")
    assert f"next:          gpt2lab chat --model {tmp_path / 'two'}   gpt2lab plot" in out  # rank 0 alone says it
    assert out.count("next:") == 1
    meta = ckpt.read_meta(ckpt.find_latest(tmp_path / "two"))["training"]
    assert (meta["world_size"], meta["grad_accum"]) == (2, 2)
    assert_same_run(tmp_path / "one", tmp_path / "two", 6)


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_on_two_ranks_equals_accumulation_in_one_process(chat_dir, tmp_path):
    train(chat_config(chat_dir, tmp_path / "one"), progress=False)
    (tmp_path / "fsdp.toml").write_text(to_toml(chat_config(chat_dir, tmp_path / "two", train={"parallel": "fsdp"})))
    torchrun(tmp_path / "fsdp.toml")
    assert ckpt.read_meta(ckpt.find_latest(tmp_path / "two"))["training"]["parallel"] == "fsdp"
    # AdamW divides by sqrt(v): a rarely seen embedding row moves by a little more than the losses.
    assert_same_run(tmp_path / "one", tmp_path / "two", 6, tol=1e-4)


def test_compiled_chat_training_equals_eager(chat_dir, tmp_path):
    # The compiled graph (aot_eager) takes the loss from full logits with ignore_index=-1, the eager
    # model the fused chunked loss: they agree to float32 rounding.
    sections = dict(train={"max_steps": 3}, eval={"every": 0}, checkpoint={"every": 3})
    train(chat_config(chat_dir, tmp_path / "eager", **sections), progress=False)
    compiled = {**sections, "train": {**sections["train"], "compile": True, "compile_backend": "aot_eager"}}
    train(chat_config(chat_dir, tmp_path / "compiled", **compiled), progress=False)
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", 3)


KILL_SCRIPT = """
import os, signal, sys
from gpt2lab.train import loop
from gpt2lab.train.config import load_train_config

real = loop.Trainer._train_step

def step_then_die(self):
    if self.counters.step == 4:  # the checkpoint of step 3 is written, step 4 is done but not saved
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self)

loop.Trainer._train_step = step_then_die
loop.train(load_train_config(sys.argv[1]), progress=False)
"""


@pytest.mark.subprocess
def test_a_killed_chat_run_resumes_bit_for_bit(chat_dir, tmp_path):
    cfg = chat_config(chat_dir, tmp_path / "run", model={"dropout": 0.1})
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    child = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "run.toml")],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-3000:]
    assert [p.name for p in ckpt.find_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert train(cfg, resume="auto", progress=False).step == 6
    train(chat_config(chat_dir, tmp_path / "straight", model={"dropout": 0.1}), progress=False)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight")
    wa, wb = (
        load_file(ckpt.checkpoint_dir(r, 6) / ckpt.WEIGHTS_FILE) for r in (tmp_path / "run", tmp_path / "straight")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
