"""gpt2lab: reproduce OpenAI's GPT-2 end to end.

>>> import gpt2lab
>>> model = gpt2lab.load_model("gpt2")            # Hub name, HF directory or gpt2lab checkpoint
>>> tok = gpt2lab.get_tokenizer()
>>> greedy = gpt2lab.SamplingParams(temperature=0)
>>> out = gpt2lab.generate(model, tok.encode("Hello"), max_new_tokens=20, sampling=greedy)
>>> print(tok.decode(out.tokens[0]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

# Public name -> the module that defines it, imported on first use (PEP 562), so `import gpt2lab` costs
# only what it uses: the CLI's `--help`, data preparation and its worker processes never load torch.
_EXPORTS = {
    "GPT": "model",
    "KVCache": "model",
    "GPTConfig": "config",
    "MODEL_PRESETS": "config",
    "GPT2LabError": "errors",
    "SamplingParams": "generate",
    "generate": "generate",
    "generate_tokens": "generate",
    "stream_text": "generate",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "Tokenizer": "tokenizer",
    "get_tokenizer": "tokenizer",
}

__all__ = [
    "GPT",
    "MODEL_PRESETS",
    "GPT2LabError",
    "GPTConfig",
    "KVCache",
    "SamplingParams",
    "Tokenizer",
    "__version__",
    "generate",
    "generate_tokens",
    "get_tokenizer",
    "load_model",
    "save_model",
    "stream_text",
]

if TYPE_CHECKING:
    from .checkpoint import load_model, save_model
    from .config import MODEL_PRESETS, GPTConfig
    from .errors import GPT2LabError
    from .generate import SamplingParams, generate, generate_tokens, stream_text
    from .model import GPT, KVCache
    from .tokenizer import Tokenizer, get_tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
