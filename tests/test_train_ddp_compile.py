"""torch.compile under DDP with gradient accumulation, on 2 gloo ranks: the same training as one process.

The torchrun test takes about 40 s on a 2-core CPU (two processes compile), so it is slow-marked.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import checkpoint as ckpt
from gpt2lab.errors import GPT2LabError
from gpt2lab.train import train
from gpt2lab.train.config import to_toml

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.subprocess
def test_compiled_ddp_with_accumulation_equals_one_process(corpus, tmp_path):
    # 2 ranks x 2 micro-steps x 4 sequences against 1 rank x 4 micro-steps: the same 16 sequences a step.
    # The compiled graph (aot_eager: dynamo and AOTAutograd, no code generation) computes the loss with
    # full logits where the eager model uses the chunked loss: they agree to float32 rounding.
    sections = dict(train={"max_steps": 4, "total_batch_tokens": 256}, checkpoint={"every": 2})
    one = train(tiny_config(corpus, tmp_path / "one", **sections), progress=False)
    assert one.step == 4
    compiled = {**sections, "train": {**sections["train"], "compile": True, "compile_backend": "aot_eager"}}
    config = tmp_path / "ddp.toml"
    config.write_text(to_toml(tiny_config(corpus, tmp_path / "two", **compiled)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*cmd, "-m", "gpt2lab", "train", str(config), "--no-progress"],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = ckpt.read_meta(ckpt.find_latest(tmp_path / "two"))
    assert (meta["training"]["world_size"], meta["training"]["grad_accum"]) == (2, 2)
    assert ckpt.read_meta(ckpt.find_latest(tmp_path / "one"))["training"]["grad_accum"] == 4
    losses_one, losses_two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses_one, losses_two):
        assert a == pytest.approx(b, abs=1e-5)
    files = ckpt.checkpoint_dir(tmp_path / "one", 4), ckpt.checkpoint_dir(tmp_path / "two", 4)
    wa, wb = (load_file(d / ckpt.WEIGHTS_FILE) for d in files)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_unknown_compile_backend_is_one_clear_error(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"compile": True, "compile_backend": "inductr"})
    with pytest.raises(GPT2LabError, match="train.compile_backend 'inductr' is not a torch.compile backend"):
        train(cfg, progress=False)
