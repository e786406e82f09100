"""gpt2lab checkpoint directories: atomic save, load, find the newest; and `load_model` for any source.

A checkpoint is a directory holding
  model.safetensors   the weights under gpt2lab's parameter names (lm_head is tied and not stored)
  gpt2lab.json        {"format": "gpt2lab", "format_version": 1, "model": GPTConfig fields,
                       "tokenizer": {"name", "vocab_hash"}, "gpt2lab_version", ...}
and, for training checkpoints, the optimizer and trainer state beside them. The directory is built
under a temporary name and renamed into place, so a directory with a gpt2lab.json is always complete.
A run directory keeps its checkpoints as `checkpoints/step_00001000/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .config import GPTConfig
from .distributed import DistEnv, broadcast_from_main, gather_to_main
from .errors import GPT2LabError
from .fileio import atomic_dir, atomic_save_safetensors, atomic_write_json, fsync_dir, load_safetensors
from .model import GPT, unwrap
from .tokenizer import Tokenizer, copy_tokenizer_files, get_tokenizer, tokenizer_from_record

META_FILE = "gpt2lab.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
CHECKPOINTS_SUBDIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
TOKENIZER_SUBDIR = "tokenizer"


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
    if isinstance(tokenizer, Tokenizer):
        tokenizer_info = tokenizer.info()
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


def find_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (by step)."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and is_checkpoint(child):
            found.append((int(m.group(1)), child))
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
    """
    from .runtime import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        ckpt = resolve_checkpoint(path)
        if ckpt is not None:
            model, _ = load_checkpoint_model(ckpt, device=device, dtype=torch_dtype)
            return model.eval()
        if not (path / "config.json").is_file():
            raise GPT2LabError(
                f"{path} is neither a gpt2lab checkpoint ({META_FILE}), a run directory with "
                f"{CHECKPOINTS_SUBDIR}/, nor a Hugging Face model directory (config.json + weights)"
            )
    from .hf import from_hf

    return from_hf(name_or_path, device=device, dtype=torch_dtype).eval()


def checkpoint_tokenizer(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Tokenizer:
    """The tokenizer a gpt2lab checkpoint was trained with (its copied files, or GPT-2's)."""
    folder = Path(folder)
    meta = read_meta(folder) if meta is None else meta
    return tokenizer_from_record(meta.get("tokenizer"), folder / TOKENIZER_SUBDIR, f"checkpoint {folder}")


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
        ckpt = resolve_checkpoint(name_or_path) if Path(name_or_path).expanduser().is_dir() else None
        tok = checkpoint_tokenizer(ckpt) if ckpt is not None else get_tokenizer()
    if model.config.vocab_size != tok.n_vocab:
        raise GPT2LabError(
            f"{name_or_path} has a vocabulary of {model.config.vocab_size} tokens but tokenizer {tok.name} has "
            f"{tok.n_vocab}; pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    return model, tok


# ---------------------------------------------------------------------------------------------------
# Training checkpoints: the model files above, plus what it takes to continue the run bit for bit.
#
#   checkpoints/step_00001000/
#     model.safetensors       weights (as above)
#     gpt2lab.json            as above, plus "training": {"step", "tokens", "val_loss", "config", ...}
#     optimizer.safetensors   AdamW state tensors, named "<parameter name>.<exp_avg|exp_avg_sq|step>"
#     trainer.json            counters, optimizer groups, schedule, loss scaler, and per rank: RNG + loader
#
# The trainer hands over its state as a dict of components, each one's state_dict() (see
# gpt2lab.train.state), and gets the same dict back from load_training_checkpoint. They are laid out
# as every trainer.json so far has them:
#
#   "model"        -> model.safetensors
#   "optimizer"    -> its "tensors" to optimizer.safetensors, the rest to trainer.json "optimizer"
#   "counters"     -> trainer.json's top level ("step", "tokens", "skipped_steps", "best_val_loss")
#   "ranks"        -> trainer.json "ranks" (a list: each rank's per-rank components), and "world_size"
#   any other      -> trainer.json under its own name, left out when empty ("grad_scaler", "schedule")
#
# The directory is built under a hidden temporary name and renamed into place, so `step_*` directories
# are always complete; a kill -9 mid-write leaves only a hidden `.step_*.tmp-*` directory, which the
# next run removes. Old checkpoints are renamed to a hidden name before deletion for the same reason.
#
# A sharded (FSDP) run writes the same directory with the model and optimizer tensors in DCP's format
# (torch.distributed.checkpoint) instead of optimizer.safetensors, each rank writing its own shards:
#
#     dcp/.metadata           DCP's index: every tensor's global shape and which file holds which rows
#     dcp/__<rank>_0.distcp   rank <rank>'s rows of "model.<name>" and "optimizer.state.<name>.<key>"
#     model.safetensors       the whole weights, gathered to rank 0 (sample, eval, convert, --init-from)
#     trainer.json            as above, with "sharded": "dcp"; "optimizer" keeps the parameter groups
#
# DCP records global offsets, so the shards load onto any number of ranks, sharded or not (see
# load_sharded_state).

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
SHARDED_SUBDIR = "dcp"
COUNTERS = ("step", "tokens", "skipped_steps", "best_val_loss")
_TRAINER_KEYS = {*COUNTERS, "world_size", "optimizer", "ranks", "sharded"}


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_SUBDIR / f"step_{step:08d}"


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    tensors = (path / OPTIMIZER_FILE).is_file() or (path / SHARDED_SUBDIR / ".metadata").is_file()
    return is_checkpoint(path) and (path / TRAINER_FILE).is_file() and tensors


def find_latest_training(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run that can be resumed (model, optimizer and trainer state)."""
    found = [p for p in find_checkpoints(run_dir) if is_training_checkpoint(p)]
    return found[-1] if found else None


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    states: dict[str, Any],
    config: GPTConfig,
    tokenizer: Tokenizer | dict[str, Any],
    training_meta: dict[str, Any],
) -> Path:
    """Write `checkpoints/step_<step>/` of `run_dir` atomically and return it.

    `states` is the dict of components above: "model", "optimizer", "counters", "ranks", and any
    others; `config` is the model's shape. A checkpoint that already exists for this step is left as
    it is (the state of a run is a function of its step, and replacing it would briefly leave no
    complete copy). A failure to write (full disk, permissions) raises GPT2LabError and leaves every
    earlier checkpoint as it was.
    """
    dest = checkpoint_dir(run_dir, step)
    if is_training_checkpoint(dest):
        return dest
    optimizer = dict(states["optimizer"])
    optimizer_tensors = optimizer.pop("tensors")
    trainer = _trainer_record(states, optimizer)
    try:
        with atomic_dir(dest, overwrite=True) as tmp:
            atomic_save_safetensors(tmp / OPTIMIZER_FILE, optimizer_tensors, metadata={"format": "pt"})
            atomic_write_json(tmp / TRAINER_FILE, trainer)
            # gpt2lab.json last: a directory holding it is a complete checkpoint.
            write_model_files(tmp, states["model"], config, tokenizer, {"training": training_meta})
    except OSError as e:
        raise GPT2LabError(_write_failed(run_dir, dest, e.strerror or str(e))) from None
    return dest


def _trainer_record(states: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    ranks = states["ranks"]
    trainer = {**states["counters"], "world_size": len(ranks), "optimizer": optimizer, "ranks": ranks}
    for name, state in states.items():
        if name not in ("model", "optimizer", "counters", "ranks") and state:
            assert name not in _TRAINER_KEYS, name
            trainer[name] = state
    return trainer


def _write_failed(run_dir: str | os.PathLike, dest: Path, why: str) -> str:
    previous = find_latest_training(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (
        f"could not write checkpoint {dest}: {why}; {kept}. Free disk space or fix the permissions, then "
        "continue with --resume auto"
    )


def save_sharded_training_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    sharded: dict[str, Any],
    states: dict[str, Any] | None,
    full_weights: dict[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: Tokenizer | dict[str, Any],
    training_meta: dict[str, Any] | None,
    env: DistEnv,
) -> Path:
    """Write `checkpoints/step_<step>/` of a sharded run; every rank calls it, and every rank gets the
    path or the same GPT2LabError.

    `sharded` is {"model": ..., "optimizer": {"state": ...}} of DTensors (train.state's Sharded*
    components), saved by DCP with every rank writing its own rows into one shared temporary
    directory. Rank 0 alone gives `states` (the other components, the optimizer's "param_groups",
    "ranks"), `full_weights` (model.safetensors) and `training_meta`, and writes them once every rank's
    shards are on disk; gpt2lab.json last, then the rename. The ranks must share a file system.
    """
    import torch.distributed.checkpoint as dcp

    dest = checkpoint_dir(run_dir, step)
    tmp_name, error, done = "", "", False
    if env.is_main:
        done = is_training_checkpoint(dest)
        if not done:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp_name = tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
            except OSError as e:
                error = _write_failed(run_dir, dest, e.strerror or str(e))
    tmp_name, error, done = broadcast_from_main((tmp_name, error, done), env)
    if error:
        raise GPT2LabError(error)
    if done:
        return dest
    tmp = Path(tmp_name)
    try:
        dcp.save(sharded, checkpoint_id=tmp / SHARDED_SUBDIR)
    except Exception as e:  # DCP gathers every rank's failure into one CheckpointException, on every rank
        error = _write_failed(run_dir, dest, f"{type(e).__name__}: {e}")
    errors = gather_to_main(error, env)
    if env.is_main:
        assert errors is not None and states is not None and training_meta is not None
        error = next((e for e in errors if e), "")
        try:
            if not error:
                trainer = {**_trainer_record(states, states["optimizer"]), "sharded": "dcp"}
                atomic_write_json(tmp / TRAINER_FILE, trainer)
                write_model_files(tmp, full_weights, config, tokenizer, {"training": training_meta})
                fsync_dir(tmp / SHARDED_SUBDIR)
                fsync_dir(tmp)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
        except OSError as e:
            error = _write_failed(run_dir, dest, e.strerror or str(e))
        if error:
            shutil.rmtree(tmp, ignore_errors=True)
    error = broadcast_from_main(error, env)
    if error:
        raise GPT2LabError(error)
    return dest


def load_sharded_state(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved_groups: list[Any]
) -> None:
    """Load a sharded checkpoint's model and optimizer tensors into `model` and its `optimizer`, on
    any number of ranks, sharded (FSDP2) or whole (one process, DDP): DCP reads each rank's rows
    (or the whole tensors) from whichever files hold them. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    if [g.get("names") for g in saved_groups] != [g.get("names") for g in optimizer.param_groups]:
        raise GPT2LabError("optimizer state names other parameters than this model's; it belongs to another model")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # lm_head.weight is the tied embedding (the same tensor): stored and read once.
    weights = {k: v for k, v in model_sd.items() if k != "lm_head.weight"}
    target = {"model": weights, "optimizer": {"state": optim_sd["state"]}}
    no_dist = not torch.distributed.is_initialized()
    try:
        with warnings.catch_warnings():
            if no_dist:  # one process reads the whole tensors: what we ask for, yet dcp.load warns that it
                # "assumes" it even when told so with no_dist=True (torch 2.13, state_dict_loader.load)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(target, checkpoint_id=folder / SHARDED_SUBDIR, no_dist=no_dist)
    except Exception as e:  # a missing key or another shape: DCP's CheckpointException names it
        raise GPT2LabError(f"cannot load the sharded state in {folder / SHARDED_SUBDIR}: {e}") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_training_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, states) of a training checkpoint: gpt2lab.json, and the dict of components that
    `save_training_checkpoint` was given, its tensors on the CPU. For a sharded checkpoint "model" is
    absent, "optimizer" holds only the parameter groups and "sharded" is the folder, for
    load_sharded_state."""
    folder = Path(folder)
    if not is_training_checkpoint(folder):
        raise GPT2LabError(
            f"{folder} is not a complete training checkpoint ({META_FILE}, {OPTIMIZER_FILE}, {TRAINER_FILE}); "
            "to start from its weights with a fresh optimizer use --init-from instead"
        )
    meta = read_meta(folder)
    path = folder / TRAINER_FILE
    try:
        trainer = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GPT2LabError(f"cannot read {path}: {e}") from None
    absent = [k for k in ("step", "tokens", "ranks") if not isinstance(trainer, dict) or k not in trainer]
    if absent:
        raise GPT2LabError(f"{path} has no {absent[0]!r}: it is damaged; resume from another checkpoint")
    states: dict[str, Any] = {"counters": {k: trainer[k] for k in COUNTERS if k in trainer}}
    if trainer.get("sharded") == "dcp":  # the tensors stay on disk until load_sharded_state reads them
        states["sharded"] = folder
        states["optimizer"] = trainer.get("optimizer", {})
    else:
        states["model"] = load_safetensors(folder / WEIGHTS_FILE)
        states["optimizer"] = {**trainer.get("optimizer", {}), "tensors": load_safetensors(folder / OPTIMIZER_FILE)}
    states.update(
        {
            "ranks": trainer["ranks"],
            **{k: v for k, v in trainer.items() if k not in _TRAINER_KEYS},
        }
    )
    # Checkpoints written before the schedule was a component of its own: it is where the step is.
    states.setdefault("schedule", {"step": trainer["step"]})
    return meta, states


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete hidden half-written or half-deleted checkpoint directories left by a killed run."""
    root = Path(run_dir) / CHECKPOINTS_SUBDIR
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith(".step_"):
                shutil.rmtree(child, ignore_errors=True)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and, with `keep_best`, the one with the lowest
    val loss. Returns the deleted paths. Each is first renamed to a hidden name, so a kill mid-delete
    never leaves a `step_*` directory that looks complete but is not. Directories that are not complete
    checkpoints (no gpt2lab.json yet, hidden temporaries) are neither counted nor touched."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (the newest checkpoint is always kept), got {keep_last}")
    found = find_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    if keep_best:
        scored = [(v, p) for p in found if (v := _val_loss_of(p)) is not None]
        if scored:
            keep.add(min(scored, key=lambda vp: vp[0])[1])
    removed = []
    for path in found:
        if path not in keep:
            doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_dir(Path(run_dir) / CHECKPOINTS_SUBDIR)
    return removed


def _val_loss_of(folder: Path) -> float | None:
    try:
        value = read_meta(folder).get("training", {}).get("val_loss")
    except GPT2LabError:
        return None
    return float(value) if isinstance(value, (int, float)) else None
