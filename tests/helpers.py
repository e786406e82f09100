"""Plain helpers shared by the tests (fixtures are in conftest.py): the checkout's paths and Tiny
Shakespeare, child processes run from this checkout's sources, and tiny GPT-2 models made with
`transformers` beside their gpt2lab twins."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Tiny Shakespeare ships with the package (the tinyshakespeare preset reads it): the tests need nothing
# beside the checkout.
SHAKESPEARE_GZ = REPO / "src" / "gpt2lab" / "data" / "tinyshakespeare.txt.gz"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


@functools.cache
def shakespeare_text() -> str:
    """The whole of Tiny Shakespeare (1,115,394 characters), checked against its published sha256."""
    data = gzip.decompress(SHAKESPEARE_GZ.read_bytes())
    assert hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256, f"{SHAKESPEARE_GZ} is damaged"
    return data.decode("utf-8")


def subprocess_env() -> dict[str, str]:
    """Environment for running gpt2lab in a child process from this checkout's sources."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli_subprocess(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m gpt2lab ARGS...` in a child process (for signals, torchrun, real exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *map(str, args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def hf_gpt2(seed: int = 0, **overrides):
    """A randomly initialised transformers GPT2LMHeadModel in eval mode (tiny unless overridden)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**{**TINY, **overrides})
    model = GPT2LMHeadModel(cfg).eval()
    # transformers initialises biases and LayerNorms to constants; randomise them so parity tests see
    # every parameter's role (a transposed or swapped bias would otherwise go unnoticed).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def gpt2lab_twin(hf_model, **config_overrides):
    """The gpt2lab GPT holding exactly `hf_model`'s weights, through the production converter."""
    from gpt2lab.hf import config_from_hf, state_dict_from_hf
    from gpt2lab.model import GPT

    cfg = config_from_hf(hf_model.config.to_dict()).replace(**config_overrides)
    sd = state_dict_from_hf(hf_model.state_dict(), cfg)
    return GPT.from_state_dict(cfg, sd).eval()
