"""The model a run starts from: fresh (GPT-2 initialisation), pretrained weights, or a checkpoint's shape."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import is_checkpoint, load_model, read_meta, resolve_checkpoint
from ..config import GPTConfig
from ..errors import GPT2LabError
from ..model import GPT
from ..tokenizer import Tokenizer, get_tokenizer
from .config import TrainConfig


def fresh_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """A randomly initialised GPT of the run's [model] shape (draws from torch's global RNG)."""
    return GPT(cfg.model_config(vocab_size=vocab_size))


def pretrained_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """The weights of `train.init_from` (Hub name, HF directory, gpt2lab checkpoint or run directory),
    with the run's dropout and vocabulary padding; the shape is the source's. The data's `tokenizer`
    must be the one the weights were trained with."""
    source = cfg.train.init_from
    explicit = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg.model, k) is not None]
    if explicit:
        raise GPT2LabError(
            f"model.{explicit[0]} cannot be set together with train.init_from: the shape comes from {source}"
        )
    if Path(source).expanduser().is_dir() and resolve_checkpoint(Path(source).expanduser()) is not None:
        source = str(resolve_checkpoint(Path(source).expanduser()))
    loaded = load_model(source)
    ckpt_dir = Path(source) if is_checkpoint(Path(source)) else None
    # Hugging Face GPT-2 weights go with GPT-2's tokenizer; a gpt2lab checkpoint records its own.
    record = read_meta(ckpt_dir).get("tokenizer") if ckpt_dir is not None else get_tokenizer().info()
    check_same_tokenizer(record, tokenizer, str(source))
    if loaded.config.vocab_size != tokenizer.n_vocab:
        raise GPT2LabError(
            f"{source} has a vocabulary of {loaded.config.vocab_size} tokens but the data was tokenized with "
            f"{tokenizer.n_vocab}; fine-tune on data prepared with the model's tokenizer"
        )
    return with_shape(
        loaded, loaded.config.replace(dropout=cfg.model.dropout, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    )


def check_same_tokenizer(record: dict | None, tokenizer: Tokenizer, what: str) -> None:
    """Refuse to train weights made with one tokenizer on data made with another (same size or not)."""
    record = record or {"name": "gpt2", "vocab_hash": get_tokenizer().vocab_hash}
    if record.get("vocab_hash") not in (None, tokenizer.vocab_hash):
        raise GPT2LabError(
            f"{what} was trained with tokenizer {record.get('name')!r} but the data was tokenized with "
            f"{tokenizer.name!r}; prepare the data with the model's tokenizer (gpt2lab prepare --tokenizer DIR)"
        )


def with_shape(model: GPT, config: GPTConfig) -> GPT:
    """`model`'s weights under `config`, which may differ in dropout and vocabulary padding only; new
    padding rows are zero (they never reach a softmax), dropped padding rows were unused."""
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    wte = weights["transformer.wte.weight"][: config.vocab_size]  # (V, C)
    pad = config.padded_vocab_size - config.vocab_size
    weights["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(pad, wte.size(1))])  # (padded V, C)
    return GPT.from_state_dict(config, weights).train()


def empty_model(config: GPTConfig, device: torch.device | str) -> GPT:
    """A GPT of `config` on `device` with its weights left uninitialised, for a training checkpoint's
    weights to be copied into (state.ModelState.load_state_dict): no time goes to a random init that
    would be overwritten, and no random numbers are drawn."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty makes a tensor per module: tie again
    return model.train()
