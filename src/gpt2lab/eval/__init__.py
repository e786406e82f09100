"""Evaluation: HellaSwag, validation loss, perplexity, bits-per-byte and CORE; from the CLI and in training.

Each takes the model, its data and an `EvalContext`, and returns an `EvalResult` with the same numbers
on one process or many, at any batch size (common.py says how).

>>> from gpt2lab.eval import EvalContext, hellaswag
>>> hellaswag.evaluate(model, tok, hellaswag.load_validation(), EvalContext(batch_size=8)).metrics()
{'hellaswag_acc_norm': 0.2955, 'hellaswag_acc': 0.2859, 'hellaswag_items': 10042}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .references import (
    CORE_REFERENCES,
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
    "CORE_REFERENCES",
    "HELLASWAG_GPT2_CHECKPOINTS",
    "HELLASWAG_REFERENCES",
    "VAL_LOSS_REFERENCES",
    "WIKITEXT2_HF_GUIDE_GPT2_LARGE",
    "WIKITEXT2_PAPER_PERPLEXITY",
    "EvalContext",
    "EvalResult",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
