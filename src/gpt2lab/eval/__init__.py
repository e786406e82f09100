"""Evaluation: HellaSwag, validation loss, perplexity and bits-per-byte; from the CLI and during training.

    hellaswag.py        HellaSwag completion-style accuracy (acc, acc_norm), as build-nanogpt / llm.c
    val_loss.py         mean loss over a fixed token budget of prepared validation shards
    perplexity.py       sliding-window perplexity and bits-per-byte of any text
    during_training.py  `eval_metrics`: the flat dict the training loop logs at eval time
    references.py       published numbers to compare with (GPT-2 124M, GPT-3 125M, ...)
    common.py           eval mode, scoring selected positions, the torchrun helpers

Every evaluation takes `rank` and `world_size`, shards its work round-robin by a fixed unit (item,
window) and all-reduces sums, so it gives the same numbers on one process or many, at any batch size.
"""

from __future__ import annotations

from .references import (
    HELLASWAG_GPT2_CHECKPOINTS,
    HELLASWAG_REFERENCES,
    VAL_LOSS_REFERENCES,
    WIKITEXT2_HF_GUIDE_GPT2_LARGE,
    WIKITEXT2_PAPER_PERPLEXITY,
)

__all__ = [
    "HELLASWAG_GPT2_CHECKPOINTS",
    "HELLASWAG_REFERENCES",
    "VAL_LOSS_REFERENCES",
    "WIKITEXT2_HF_GUIDE_GPT2_LARGE",
    "WIKITEXT2_PAPER_PERPLEXITY",
]
