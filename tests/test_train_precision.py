"""float16 training with a loss scaler, resumed exactly; deterministic mode, on CPU and as it sets up CUDA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import checkpoint as ckpt
from gpt2lab import distributed
from gpt2lab.errors import GPT2LabError
from gpt2lab.runtime import deterministic, deterministic_cublas
from gpt2lab.train import checkpoint as train_checkpoint
from gpt2lab.train import train
from gpt2lab.train.config import load_train_config, to_toml
from gpt2lab.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def eager_scaler(monkeypatch):
    """A loss scaler that starts too high and grows every 2 clean steps, so that a few steps of the tiny
    model see overflows, skipped updates and growth: state that a resume must carry over exactly."""

    class Scaler(torch.amp.GradScaler):
        def __init__(self, device: str = "cuda", **kwargs) -> None:
            super().__init__(device, init_scale=2.0**20, growth_interval=2, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def trainer_state(run: Path, step: int) -> dict:
    """The checkpoint's trainer.json as it is on disk."""
    return json.loads((ckpt.checkpoint_dir(run, step) / train_checkpoint.TRAINER_FILE).read_text())


def test_fp16_with_loss_scaling_resumes_exactly(corpus, tmp_path, eager_scaler):
    fp16 = dict(train={"precision": "fp16"})
    straight = train(tiny_config(corpus, tmp_path / "straight", **fp16), progress=False)
    assert straight.step == 8 and straight.loss is not None
    overflows = [r["message"] for r in records(tmp_path / "straight", "event") if "overflowed" in r["message"]]
    assert overflows[:2] == [
        "float16 gradients overflowed at step 1: update skipped, loss scale now 524288",
        "float16 gradients overflowed at step 2: update skipped, loss scale now 262144",
    ]
    # Two clean steps (3 and 4) after the overflows doubled 2^18 again; JSON numbers in the trainer state.
    assert trainer_state(tmp_path / "straight", 4)["grad_scaler"] == {
        "scale": 524288.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2,
        "_growth_tracker": 0,
    }

    part = train(tiny_config(corpus, tmp_path / "resumed", **fp16), stop_at=5, progress=False)
    assert part.step == 5
    rest = train(tiny_config(corpus, tmp_path / "resumed", **fp16), resume="auto", progress=False)
    assert rest.step == 8
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert (
        trainer_state(tmp_path / "resumed", 8)["grad_scaler"] == trainer_state(tmp_path / "straight", 8)["grad_scaler"]
    )
    a, b = (load_file(ckpt.checkpoint_dir(tmp_path / r, 8) / ckpt.WEIGHTS_FILE) for r in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_scaler_state_without_float16(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "run", train={"max_steps": 4}), progress=False)
    assert "grad_scaler" not in trainer_state(tmp_path / "run", 4)


def test_deterministic_mode_on_cpu_changes_nothing_and_repeats(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    sections = dict(model={"dropout": 0.1}, data={"shuffle": True})
    plain = train(tiny_config(corpus, tmp_path / "plain", **sections), progress=False)
    det = {**sections, "train": {"deterministic": True}}
    once = train(tiny_config(corpus, tmp_path / "once", **det), progress=False)
    again = train(tiny_config(corpus, tmp_path / "again", **det), progress=False)
    assert plain.step == once.step == again.step == 8
    assert train_losses(tmp_path / "once") == train_losses(tmp_path / "again") == train_losses(tmp_path / "plain")
    w = [load_file(ckpt.checkpoint_dir(tmp_path / r, 8) / ckpt.WEIGHTS_FILE) for r in ("plain", "once", "again")]
    assert all(torch.equal(w[0][k], w[1][k]) and torch.equal(w[1][k], w[2][k]) for k in w[0])
    assert not torch.are_deterministic_algorithms_enabled()  # switched on for the training steps only
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_is_a_config_key_and_an_override(tmp_path):
    cfg = load_train_config(None, ["train.deterministic=true"])
    assert cfg.train.deterministic is True
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg))
    assert load_train_config(path).train.deterministic is True
    with pytest.raises(GPT2LabError, match="train.deterministic"):
        load_train_config(None, ["train.deterministic=3"])


def test_deterministic_settings_on_cuda_and_restored_after():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    with deterministic(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    with deterministic(torch.device("cpu")):  # CPU attention kernels are left as they are
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]


def test_cublas_workspace_is_set_before_cuda_starts_or_reported(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a deterministic setting of the user's stays
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert deterministic_cublas() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not deterministic_cublas()  # too late for this process's cuBLAS


def test_deterministic_training_after_cuda_started_is_a_clear_error(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(
        distributed, "setup", lambda device="auto", **kw: distributed.DistEnv(device=torch.device("cuda", 0))
    )
    cfg = tiny_config(corpus, tmp_path / "run", train={"deterministic": True})
    message = (
        "train.deterministic: CUDA was already started in this process without CUBLAS_WORKSPACE_CONFIG; "
        "set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before starting Python"
    )
    with pytest.raises(GPT2LabError, match=message.replace("(", r"\(")):
        Trainer(cfg, progress=False)
