"""gpt2lab: reproduce OpenAI's GPT-2 end to end.

>>> import gpt2lab
>>> model = gpt2lab.load_model("gpt2")            # Hub name, HF directory or gpt2lab checkpoint
>>> tok = gpt2lab.get_tokenizer()
>>> greedy = gpt2lab.SamplingParams(temperature=0)
>>> out = gpt2lab.generate(model, tok.encode("Hello"), max_new_tokens=20, sampling=greedy)
>>> print(tok.decode(out.tokens[0]))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint import load_model, save_model
from .config import PRESETS, GPTConfig
from .errors import GPT2LabError
from .generate import SamplingParams, generate, generate_tokens, stream_text
from .model import GPT, KVCache
from .tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "GPT",
    "PRESETS",
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
