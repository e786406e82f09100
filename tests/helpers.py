"""Builders shared by the tests: tiny GPT-2 models made with `transformers`, and their gpt2lab twins."""

from __future__ import annotations

import torch

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


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
