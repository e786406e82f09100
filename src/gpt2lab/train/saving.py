"""A run's checkpoints as the trainer sees them: which one a run continues from, and writing the state
after a step.

One process and DDP: rank 0 writes everything, the per-rank parts (RNG states, loader positions)
gathered from every rank first. FSDP: every rank writes its shards through DCP and rank 0 the rest
(checkpoint.save_sharded_training_checkpoint). Either way every rank learns the outcome, so a failed
write stops all of them instead of leaving some waiting. What goes into a checkpoint is the
components of train/state.py; how it is laid out in files is gpt2lab.checkpoint's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from .. import distributed as D
from ..config import GPTConfig
from ..errors import GPT2LabError
from ..metrics import MetricsWriter
from ..tokenizer import Tokenizer
from .optim import optimizer_groups
from .state import PER_RANK, ShardedModelState, ShardedOptimizerState, Stateful


def find_resume(run_dir: Path, resume: str, env: D.DistEnv) -> Path | None:
    """The checkpoint to continue from for `--resume` auto | never | PATH, decided by rank 0 so that
    every rank reads the same one; None starts afresh. A refusal is a GPT2LabError on every rank."""
    found: Path | None = None
    error = ""
    if env.is_main:
        if resume == "auto":
            found = ckpt.find_latest_training(run_dir)
        elif resume == "never":
            if ckpt.find_checkpoints(run_dir):
                error = (
                    f"{run_dir} already has checkpoints (newest: {ckpt.find_latest(run_dir)}); "
                    "continue that run with --resume auto, or set another train.out_dir"
                )
        else:
            found = ckpt.resolve_checkpoint(resume) if Path(resume).is_dir() else None
            if found is None or not ckpt.is_training_checkpoint(found):
                error = (
                    f"--resume {resume}: no training checkpoint there; give a run directory or a "
                    "checkpoints/step_* directory, or use --init-from to start from weights only"
                )
    found, error = D.broadcast_from_main((found, error), env)
    if error:
        raise GPT2LabError(error)
    return found


class CheckpointWriter:
    """Writes a run's checkpoints into `run_dir` (DCP shards when `sharded`, the FSDP layout) and prunes
    the old ones (keep_last, keep_best)."""

    def __init__(
        self,
        run_dir: Path,
        env: D.DistEnv,
        model_config: GPTConfig,
        tokenizer: Tokenizer,
        keep_last: int,
        keep_best: bool,
        sharded: bool,
    ) -> None:
        self.run_dir, self.env = run_dir, env
        self.model_config, self.tokenizer = model_config, tokenizer
        self.keep_last, self.keep_best, self.sharded = keep_last, keep_best, sharded

    def save(
        self,
        step: int,
        components: dict[str, Stateful],
        meta: dict[str, Any],
        metrics: MetricsWriter | None,
        previous: Path | None,
    ) -> Path | None:
        """The state after `step` steps: every component's state_dict(), the per-rank ones gathered
        from every rank. `metrics` (rank 0's) is synced first, so that the checkpoint never runs ahead
        of metrics.jsonl. Returns the new checkpoint (on the ranks that know it; `previous` elsewhere)."""
        ranks = D.gather_to_main({name: components[name].state_dict() for name in PER_RANK}, self.env)
        newest = self._save_sharded(step, components, ranks, meta, metrics) if self.sharded else previous
        error = ""
        if self.env.is_main:
            try:
                if not self.sharded:
                    states = {n: comp.state_dict() for n, comp in components.items() if n not in PER_RANK}
                    states["ranks"] = ranks
                    assert metrics is not None
                    metrics.sync()
                    newest = ckpt.save_training_checkpoint(
                        self.run_dir, step, states, self.model_config, self.tokenizer, meta
                    )
                ckpt.prune_checkpoints(self.run_dir, self.keep_last, self.keep_best)
            except GPT2LabError as e:
                error = str(e)
            except OSError as e:  # syncing metrics.jsonl or removing an old checkpoint
                error = f"checkpoint bookkeeping in {self.run_dir} failed ({e}); newest checkpoint: {newest}"
        error = D.broadcast_from_main(error, self.env)  # the other ranks stop too instead of waiting
        if error:
            raise GPT2LabError(error)
        return newest

    def _save_sharded(
        self,
        step: int,
        components: dict[str, Stateful],
        ranks: list[Any] | None,
        meta: dict[str, Any],
        metrics: MetricsWriter | None,
    ) -> Path:
        """The FSDP checkpoint's files; all ranks take part in each collective."""
        model, optimizer = components["model"], components["optimizer"]
        assert isinstance(model, ShardedModelState) and isinstance(optimizer, ShardedOptimizerState)
        # The tied lm_head is the embedding: stored once, as in model.safetensors.
        weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        sharded = {"model": weights, "optimizer": optimizer.state_dict()}
        full = model.full_weights()  # rank 0: one float32 copy of the weights in host memory
        states: dict[str, Any] | None = None
        if self.env.is_main:
            assert metrics is not None
            skip = ("model", "optimizer", *PER_RANK)
            states = {n: comp.state_dict() for n, comp in components.items() if n not in skip}
            states["optimizer"] = {"param_groups": optimizer_groups(optimizer.optimizer)}
            states["ranks"] = ranks
            metrics.sync()
        return ckpt.save_sharded_training_checkpoint(
            self.run_dir, step, sharded, states, full, self.model_config, self.tokenizer, meta, self.env
        )
