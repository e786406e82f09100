"""The training loop's own code reads the device once per optimizer step and makes no tensors from
Python values: on a GPU each would be a synchronisation or a blocking copy."""

from __future__ import annotations

import sys

import pytest
import torch
from train_utils import tiny_config, train_losses

from gpt2lab.train import loop, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_device_read_per_step_and_no_tensors_from_python_values(corpus, tmp_path, monkeypatch):
    calls: list[str] = []

    def count_from_loop(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop.__file__:
                calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    # Every way a tensor's value reaches Python, and every way Python values become a tensor.
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        count_from_loop(torch.Tensor, name)
    for name in ("tensor", "as_tensor", "from_numpy", "full"):
        count_from_loop(torch, name)
    cfg = tiny_config(corpus, tmp_path / "run", train={"max_steps": 3}, checkpoint={"every": 0})
    assert cfg.train.total_batch_tokens // (cfg.train.batch_size * cfg.train.seq_len) == 2  # 2 micro-steps
    result = train(cfg, progress=False)
    assert result.step == 3
    assert calls == ["tolist"] * 3
    assert len(train_losses(tmp_path / "run")) == 3
