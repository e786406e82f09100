"""Reading models: `load_model` for any source, and the gpt2lab checkpoint directory it reads without
the Hugging Face bridge.

A checkpoint is a directory holding
  model.safetensors   the weights under gpt2lab's parameter names (lm_head is tied and not stored)
  gpt2lab.json        {"format": "gpt2lab", "format_version": 1, "model": GPTConfig fields,
                       "tokenizer": {"name", "vocab_hash"}, "gpt2lab_version", ...}
  tokenizer/          a trained tokenizer's files (GPT-2's is recorded by name and hash only)
The directory is built under a temporary name and renamed into place, so a directory with a
gpt2lab.json is always complete. A run directory keeps its checkpoints as `checkpoints/step_00001000/`;
a training checkpoint holds the optimizer and trainer state beside the model (gpt2lab.train.checkpoint
writes, resumes and prunes those), and reads here as the model it holds.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .chat import chat_tokenizer, template_of
from .config import GPTConfig
from .errors import GPT2LabError
from .fileio import atomic_dir, atomic_save_safetensors, atomic_write_json, load_safetensors
from .model import GPT, unwrap
from .tokenizer import Tokenizer, copy_tokenizer_files, get_tokenizer, tokenizer_from_record

META_FILE = "gpt2lab.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
TOKENIZER_SUBDIR = "tokenizer"
# Names that only a file on disk has: a Hub id is `user/model`, never a weights or config file.
LOCAL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".gguf")


def model_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The tensors to store: every parameter once (the tied lm_head is the embedding)."""
    model = unwrap(model)
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def write_model_files(
    folder: Path,
    weights: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: Tokenizer | dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model.safetensors (`weights`, from `model_weights`) and gpt2lab.json into an existing
    (temporary) folder.

    A trained tokenizer (one with its own directory) is copied into `tokenizer/`, so the checkpoint
    carries everything `sample`, `eval` and `convert` need; GPT-2's is recorded by name and hash.
    """
    chat = None
    if isinstance(tokenizer, Tokenizer):
        tokenizer_info = tokenizer.info()
        template = template_of(tokenizer)
        chat = template.to_record() if template is not None else None
        if tokenizer.path is not None:
            copy_tokenizer_files(tokenizer, folder / TOKENIZER_SUBDIR)
    else:
        tokenizer_info = tokenizer
    atomic_save_safetensors(folder / WEIGHTS_FILE, weights, metadata={"format": "pt"})
    meta = {
        "format": "gpt2lab",
        "format_version": FORMAT_VERSION,
        "gpt2lab_version": __version__,
        "model": config.to_dict(),
        "tokenizer": tokenizer_info,
        **({"chat_template": chat} if chat else {}),
        **(extra or {}),
    }
    atomic_write_json(folder / META_FILE, meta)


def save_model(
    model: GPT,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | dict[str, Any],
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save weights + metadata as a gpt2lab checkpoint directory, atomically."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GPT2LabError(f"{out} already exists and is not empty; choose a new --out or pass --overwrite")
    with atomic_dir(out, overwrite=True) as tmp:
        write_model_files(tmp, model_weights(model), unwrap(model).config, tokenizer, extra)
    return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GPT2LabError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "gpt2lab":
        raise GPT2LabError(f"{path} is not a gpt2lab checkpoint description")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise GPT2LabError(
            f"{path} has format_version {meta['format_version']}, newer than this gpt2lab understands "
            f"({FORMAT_VERSION}); upgrade gpt2lab"
        )
    return meta


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where a run keeps its checkpoint of step `step` (complete or not)."""
    return Path(run_dir) / CHECKPOINTS_SUBDIR / f"step_{step:08d}"


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (by step)."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and is_checkpoint(child):
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    found = find_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint directory itself, or the newest checkpoint of a run directory, or None."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    return find_latest(path)


def load_checkpoint_model(
    folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, dict[str, Any]]:
    """The model stored in a gpt2lab checkpoint directory, and its metadata."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        config = GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise GPT2LabError(f"{folder / META_FILE}: bad model description ({e})") from None
    sd = load_safetensors(folder / WEIGHTS_FILE)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    for k, shape in expected.items():
        if k not in sd:
            raise GPT2LabError(f"missing weight {k} in {folder / WEIGHTS_FILE}")
        if tuple(sd[k].shape) != shape:
            raise GPT2LabError(
                f"weight {k} in {folder / WEIGHTS_FILE} has shape {list(sd[k].shape)}, expected {list(shape)}"
            )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise GPT2LabError(f"unexpected weight {unexpected[0]} in {folder / WEIGHTS_FILE}")
    return GPT.from_state_dict(config, sd, device=device, dtype=dtype), meta


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> GPT:
    """A GPT in eval mode from a Hub name (`gpt2`, `openai-community/gpt2-xl`, ...), a Hugging Face
    directory or weights file, a gpt2lab checkpoint directory, or a run directory (its newest checkpoint).
    A name that looks like a local path (`looks_local`) and names nothing is an error at once, without
    asking the Hub.
    """
    from .runtime import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    missing = missing_model_path(name_or_path)
    if missing:  # before the Hub: a mistyped path is not a download failure
        raise GPT2LabError(missing)
    if path.is_dir():
        found = resolve_checkpoint(path)
        if found is not None:
            model, _ = load_checkpoint_model(found, device=device, dtype=torch_dtype)
            return model.eval()
        if not (path / "config.json").is_file():
            raise GPT2LabError(
                f"{path} is neither a gpt2lab checkpoint ({META_FILE}), a run directory with "
                f"{CHECKPOINTS_SUBDIR}/, nor a Hugging Face model directory (config.json + weights)"
            )
    from .hf import from_hf

    return from_hf(name_or_path, device=device, dtype=torch_dtype).eval()


def looks_local(name: str | os.PathLike) -> bool:
    """Whether `name` can only mean a path on this machine, not a Hub id (`gpt2`, `user/model`): it starts
    with `.`, `/` or `~`, has more than one slash, ends like a weights or config file, names a run's
    checkpoint, or its first component is a local directory (`runs/demoo` beside `runs/`)."""
    text = os.fspath(name)
    posix = text.replace(os.sep, "/")
    parts = [part for part in posix.split("/") if part]
    if posix.startswith((".", "/", "~")) or os.path.isabs(text) or posix.count("/") > 1:
        return True
    if posix.lower().endswith(LOCAL_SUFFIXES) or (parts and STEP_DIR.match(parts[-1])):
        return True
    return len(parts) > 1 and Path(parts[0]).is_dir()


def closest_path(name: str | os.PathLike) -> tuple[str, Path | None]:
    """For a path where nothing exists: what is missing, in words, and the existing path whose name is
    closest to the first missing part (in the deepest folder that does exist), or None."""
    path = Path(name).expanduser()
    parent, lost = path.parent, path.name  # the deepest existing folder, and the first missing part below it
    while not parent.exists() and parent != parent.parent:
        parent, lost = parent.parent, parent.name
    what = "no such file or directory" if parent == path.parent else f"{parent / lost} does not exist"
    try:
        names = [child.name for child in parent.iterdir() if not child.name.startswith(".")]
    except OSError:
        names = []
    below = path.relative_to(parent / lost)
    guesses = [parent / close / below for close in difflib.get_close_matches(lost, names, n=3)]
    return what, next((guess for guess in guesses if guess.exists()), None)


def missing_model_path(name: str | os.PathLike) -> str | None:
    """The one-line error for a model name that looks like a local path (`looks_local`) where nothing
    exists, with the closest name that does exist; None otherwise."""
    if Path(name).expanduser().exists() or not looks_local(name):
        return None
    what, guess = closest_path(name)
    if guess is not None:
        return f"no model at {os.fspath(name)} ({what}); did you mean {guess}?"
    return (
        f"no model at {os.fspath(name)} ({what}); check the path: a run directory, a checkpoint, or a "
        "Hugging Face model directory"
    )


def checkpoint_tokenizer(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer a gpt2lab checkpoint was trained with (its copied files, or GPT-2's), with the chat
    tokens when the checkpoint records a chat template."""
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    base = tokenizer_from_record(meta.get("tokenizer"), folder / TOKENIZER_SUBDIR, f"checkpoint {folder}")
    return chat_tokenizer(meta.get("chat_template"), base, f"checkpoint {folder}")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> tuple[GPT, Tokenizer]:
    """`load_model`, plus the tokenizer that goes with it: the one given, the one a gpt2lab checkpoint
    carries, or GPT-2's. A vocabulary that does not match the tokenizer is an error."""
    model = load_model(name_or_path, device=device, dtype=dtype)
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = get_tokenizer(tokenizer)
    else:
        found = resolve_checkpoint(name_or_path) if Path(name_or_path).expanduser().is_dir() else None
        tok = checkpoint_tokenizer(found) if found is not None else get_tokenizer()
    if model.config.vocab_size != tok.n_vocab and Path(name_or_path).expanduser().is_dir():
        from .hf import with_hf_chat_tokens  # a chat model exported to Hugging Face: its added tokens

        tok = with_hf_chat_tokens(Path(name_or_path).expanduser(), tok)
    if model.config.vocab_size != tok.n_vocab:
        raise GPT2LabError(
            f"{name_or_path} has a vocabulary of {model.config.vocab_size} tokens but tokenizer {tok.name} has "
            f"{tok.n_vocab}; pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    return model, tok
