"""Evaluation: HellaSwag, validation loss, perplexity and bits-per-byte; from the CLI and during training.

    common.py           EvalContext (device, ranks, precision, batch size, progress), EvalResult, the
                        distributed windowed sum, eval mode, scoring selected positions
    hellaswag.py        HellaSwag completion-style accuracy (acc, acc_norm), as build-nanogpt / llm.c
    val_loss.py         mean loss over a fixed token budget of prepared validation shards
    perplexity.py       sliding-window perplexity and bits-per-byte of any text
    references.py       published numbers to compare with (GPT-2 124M, GPT-3 125M, ...)

Every evaluation takes the model, its data and an `EvalContext`, and returns an `EvalResult` whose
`metrics()` is the flat dict metrics.jsonl records and whose `to_dict()` is what `--json` writes. It
shards its work round-robin by a fixed unit (item, window) and all-reduces sums, so it gives the
same numbers on one process or many, at any batch size. The training loop calls the same functions
(gpt2lab.train.evaluate).

>>> from gpt2lab.eval import EvalContext, hellaswag
>>> ctx = EvalContext(batch_size=8, progress=True)
>>> hellaswag.evaluate(model, tok, hellaswag.load_validation(), ctx).metrics()
{'hellaswag_acc_norm': 0.2955, 'hellaswag_acc': 0.2859, 'hellaswag_items': 10042}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .references import (
    HELLASWAG_GPT2_CHECKPOINTS,
    HELLASWAG_REFERENCES,
    VAL_LOSS_REFERENCES,
    WIKITEXT2_HF_GUIDE_GPT2_LARGE,
    WIKITEXT2_PAPER_PERPLEXITY,
)

# Imported on first use: the reference numbers above need no torch (plots read them).
_EXPORTS = {"EvalContext": "common", "EvalResult": "common"}

if TYPE_CHECKING:
    from .common import EvalContext, EvalResult

__all__ = [
    "HELLASWAG_GPT2_CHECKPOINTS",
    "HELLASWAG_REFERENCES",
    "VAL_LOSS_REFERENCES",
    "WIKITEXT2_HF_GUIDE_GPT2_LARGE",
    "WIKITEXT2_PAPER_PERPLEXITY",
    "EvalContext",
    "EvalResult",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
