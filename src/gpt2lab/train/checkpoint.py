"""Training checkpoints: the state that continues a run bit for bit, written after a step, found and
restored when the run starts again, and pruned to what `checkpoint.keep_last` / `keep_best` keep.

The run's state is a dict of `Stateful` components (torchtitan's state_dict / load_state_dict) handed
to the `Checkpointer` as one dict: model, optimizer, grad_scaler, schedule, counters, and per rank the
loader's position and the RNGs. One process and DDP: rank 0 writes the files; a sharded (FSDP) run
writes the model and optimizer tensors in DCP's format, every rank its own rows. Every checkpoint is
built under a hidden temporary name and renamed into place. The files: docs/formats.md.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CHECKPOINTS_SUBDIR,
    META_FILE,
    WEIGHTS_FILE,
    checkpoint_dir,
    closest_path,
    find_checkpoints,
    find_latest,
    is_checkpoint,
    read_meta,
    resolve_checkpoint,
    write_model_files,
)
from ..config import GPTConfig
from ..distributed import DistEnv, broadcast_from_main, gather_to_main
from ..errors import GPT2LabError
from ..fileio import (
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_json,
    fsync_dir,
    load_safetensors,
    temp_dir_beside,
)
from ..metrics import MetricsWriter
from ..tokenizer import Tokenizer
from .config import CheckpointSection
from .optim import optimizer_groups
from .state import (
    ModelState,
    OptimizerState,
    ShardedModelState,
    ShardedOptimizerState,
    Stateful,
    check_param_names,
)

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
SHARDED_SUBDIR = "dcp"
PER_RANK = ("rng", "loader")
COUNTERS = ("step", "tokens", "skipped_steps", "best_val_loss")
_TRAINER_KEYS = {*COUNTERS, "world_size", "optimizer", "ranks", "sharded"}

# ------------------------------------------------------------------------------------- files


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

    `states` is the components' states: "model", "optimizer", "counters", "ranks" (each rank's PER_RANK
    ones), and any others; `config` is the model's shape. A checkpoint that already exists for this
    step is left as it is (the state of a run is a function of its step, and replacing it would briefly
    leave no complete copy). A failure to write (full disk, permissions) raises GPT2LabError and leaves
    every earlier checkpoint as it was.
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

    `sharded` is {"model": ..., "optimizer": {"state": ...}} of DTensors (the Sharded* components'),
    saved by DCP with every rank writing its own rows into one shared temporary directory. Rank 0
    alone gives `states` (the other components, the optimizer's "param_groups", "ranks"),
    `full_weights` (model.safetensors) and `training_meta`, and writes them once every rank's shards
    are on disk; gpt2lab.json last, then the rename. The ranks must share a file system.
    """
    import torch.distributed.checkpoint as dcp

    dest = checkpoint_dir(run_dir, step)
    tmp_name, error, done = "", "", False
    if env.is_main:
        done = is_training_checkpoint(dest)
        if not done:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp_name = str(temp_dir_beside(dest))
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
        error = next((message for message in errors if message), "")
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


def load_training_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, states) of a training checkpoint: gpt2lab.json, and the states that
    `save_training_checkpoint` was given, its tensors on the CPU. For a sharded checkpoint "model" is
    absent, "optimizer" holds only the parameter groups and "sharded" is the folder, for
    load_sharded_state."""
    folder = Path(folder)
    if not is_training_checkpoint(folder):
        raise GPT2LabError(
            f"{folder} is not a complete training checkpoint ({META_FILE}, {OPTIMIZER_FILE}, "
            f"{TRAINER_FILE}); to start from its weights with a fresh optimizer use --init-from instead"
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
    states["ranks"] = trainer["ranks"]
    states.update({k: v for k, v in trainer.items() if k not in _TRAINER_KEYS})
    # Checkpoints written before the schedule was a component of its own: it is where the step is.
    states.setdefault("schedule", {"step": trainer["step"]})
    return meta, states


def load_sharded_state(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved_groups: list[Any]
) -> None:
    """Load a sharded checkpoint's model and optimizer tensors into `model` and its `optimizer`, on
    any number of ranks, sharded (FSDP2) or whole (one process, DDP): DCP reads each rank's rows
    (or the whole tensors) from whichever files hold them. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(folder)
    check_param_names(optimizer, saved_groups)
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


# ------------------------------------------------------------------------------------- the checkpointer


def find_resume(run_dir: Path, resume: str, env: DistEnv) -> Path | None:
    """The checkpoint to continue from for `--resume` auto | never | PATH, decided by rank 0 so that
    every rank reads the same one; None starts afresh. A refusal is a GPT2LabError on every rank."""
    found: Path | None = None
    error = ""
    if env.is_main:
        if resume == "auto":
            found = find_latest_training(run_dir)
        elif resume == "never":
            if find_checkpoints(run_dir):
                error = (
                    f"{run_dir} already has checkpoints (newest: {find_latest(run_dir)}); "
                    "continue that run with --resume auto, or set another train.out_dir"
                )
        else:
            found = resolve_checkpoint(resume) if Path(resume).is_dir() else None
            if not Path(resume).expanduser().exists():
                what, guess = closest_path(resume)
                word = difflib.get_close_matches(resume, ["auto", "never"], n=1)
                hint = f"did you mean {guess}?" if guess else f"did you mean --resume {word[0]}?" if word else ""
                error = f"--resume {resume}: {what}; " + (hint or "give auto, never or a run directory")
            elif found is None or not is_training_checkpoint(found):
                error = (
                    f"--resume {resume}: no training checkpoint there; give a run directory or a "
                    "checkpoints/step_* directory, or use --init-from to start from weights only"
                )
    found, error = broadcast_from_main((found, error), env)
    if error:
        raise GPT2LabError(error)
    return found


class Checkpointer:
    """A run's checkpoints in `run_dir`: the state of `states` (the run's components by name, "model"
    and "optimizer" from model_and_optimizer_states) written after a step and pruned to `keep`'s
    counts, or restored from a checkpoint. Sharded when the model component is."""

    def __init__(
        self, run_dir: Path, env: DistEnv, tokenizer: Tokenizer, keep: CheckpointSection, states: dict[str, Stateful]
    ) -> None:
        self.run_dir, self.env, self.tokenizer, self.keep, self.states = run_dir, env, tokenizer, keep, states
        model = states["model"]
        assert isinstance(model, (ModelState, ShardedModelState))
        self.model, self.sharded = model.model, isinstance(model, ShardedModelState)

    def save(
        self, step: int, meta: dict[str, Any], metrics: MetricsWriter | None, previous: Path | None
    ) -> Path | None:
        """The state after `step` steps: every component's state_dict(), the per-rank ones gathered
        from every rank. `metrics` (rank 0's) is synced first, so that the checkpoint never runs ahead
        of metrics.jsonl. Returns the new checkpoint (on the ranks that know it; `previous` elsewhere)."""
        ranks = gather_to_main({name: self.states[name].state_dict() for name in PER_RANK}, self.env)
        newest = self._save_sharded(step, ranks, meta, metrics) if self.sharded else previous
        error = ""
        if self.env.is_main:
            try:
                if not self.sharded:
                    states = {n: comp.state_dict() for n, comp in self.states.items() if n not in PER_RANK}
                    states["ranks"] = ranks
                    assert metrics is not None
                    metrics.sync()
                    newest = save_training_checkpoint(
                        self.run_dir, step, states, self.model.config, self.tokenizer, meta
                    )
                prune_checkpoints(self.run_dir, self.keep.keep_last, self.keep.keep_best)
            except GPT2LabError as e:
                error = str(e)
            except OSError as e:  # syncing metrics.jsonl or removing an old checkpoint
                error = f"checkpoint bookkeeping in {self.run_dir} failed ({e}); newest checkpoint: {newest}"
        error = broadcast_from_main(error, self.env)  # the other ranks stop too instead of waiting
        if error:
            raise GPT2LabError(error)
        return newest

    def _save_sharded(
        self, step: int, ranks: list[Any] | None, meta: dict[str, Any], metrics: MetricsWriter | None
    ) -> Path:
        """The FSDP checkpoint's files; all ranks take part in each collective."""
        model, optimizer = self.states["model"], self.states["optimizer"]
        assert isinstance(model, ShardedModelState) and isinstance(optimizer, ShardedOptimizerState)
        # The tied lm_head is the embedding: stored once, as in model.safetensors.
        weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        sharded = {"model": weights, "optimizer": optimizer.state_dict()}
        full = model.full_weights()  # rank 0: one float32 copy of the weights in host memory
        states: dict[str, Any] | None = None
        if self.env.is_main:
            assert metrics is not None
            skip = ("model", "optimizer", *PER_RANK)
            states = {n: comp.state_dict() for n, comp in self.states.items() if n not in skip}
            states["optimizer"] = {"param_groups": optimizer_groups(optimizer.optimizer)}
            states["ranks"] = ranks
            metrics.sync()
        return save_sharded_training_checkpoint(
            self.run_dir, step, sharded, states, full, self.model.config, self.tokenizer, meta, self.env
        )

    def restore(self, saved: dict[str, Any], source: Path, seed: int) -> None:
        """Every component from `saved` (load_training_checkpoint's states of `source`). A checkpoint
        of another number of ranks gives every rank the data position, and fresh dropout masks."""
        rank, world_size = self.env.rank, self.env.world_size
        ranks = saved["ranks"]
        same_ranks = len(ranks) == world_size
        # The loader position is global (the same on every rank), so it carries over to another world size;
        # the RNG states belong to their ranks.
        states = {**saved, **(ranks[rank] if same_ranks else {"loader": ranks[0]["loader"]})}
        try:
            if "sharded" in saved:  # DCP's shards, onto this run's ranks, sharded or not
                optimizer = self.states["optimizer"]
                assert isinstance(optimizer, (OptimizerState, ShardedOptimizerState))
                groups = saved["optimizer"].get("param_groups", [])
                load_sharded_state(saved["sharded"], self.model, optimizer.optimizer, groups)
                states = {k: v for k, v in states.items() if k not in ("model", "optimizer")}
            for name, component in self.states.items():
                if states.get(name):  # absent or {}: e.g. no loss scaler was saved; the fresh one stays
                    component.load_state_dict(states[name])
        except GPT2LabError as e:
            raise GPT2LabError(f"{source}: {e}") from None
        if not same_ranks:  # another number of ranks: the data order continues, dropout masks are drawn afresh
            torch.manual_seed(seed + states["counters"]["step"] + rank)
