"""Weights & Biases logging (train.wandb_project): the records of metrics.jsonl, mirrored into a wandb run.

Rank 0's MetricsWriter hands every record it writes to a WandbRun, which logs train and eval numbers
under "train/..." and "eval/..." with the optimizer step as their x-axis ("step"), and the text samples
as one table that grows with each evaluation. Events (resumes, skipped steps) go to metrics.jsonl only;
wandb keeps the console output itself.

The wandb run's id is kept in RUN/wandb.json, so `--resume auto` logs into the same wandb run
(`resume="allow"`), and a fresh start of the run directory makes a new one. wandb's history is
append-only: the steps a resumed run redoes (those after its checkpoint) appear in it twice, where
metrics.jsonl is cut back to the checkpoint. `wandb` is an optional extra, imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import GPT2LabError
from ..fileio import atomic_write_text
from ..metrics import METRICS_FILE, read_metrics

WANDB_STATE_FILE = "wandb.json"
SAMPLE_COLUMNS = ["step", "prompt", "text"]


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise GPT2LabError("train.wandb_project needs the wandb package: pip install 'gpt2lab[wandb]'") from None
    return wandb


def stored_run_id(run_dir: str | os.PathLike) -> str | None:
    """The wandb run id RUN/wandb.json names, or None (no file, or one that cannot be read)."""
    try:
        run_id = json.loads((Path(run_dir) / WANDB_STATE_FILE).read_text(encoding="utf-8")).get("id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


class WandbRun:
    """One wandb run fed metrics.jsonl's records (see the module's docstring). Only rank 0 makes one.

    `resume`: the run continues from a checkpoint, so the wandb run RUN/wandb.json names (if any) goes
    on, its sample table starting from the samples metrics.jsonl has kept (it is cut back first).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        project: str,
        config: dict[str, Any],
        *,
        entity: str = "",
        name: str = "",
        resume: bool = False,
    ) -> None:
        wandb = _import_wandb()
        run_dir = Path(run_dir)
        run_id = stored_run_id(run_dir) if resume else None
        # Inside the run directory unless WANDB_DIR says otherwise: the run carries its own wandb files.
        wandb_dir = os.environ.get("WANDB_DIR") or str(run_dir)
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(
                project=project,
                entity=entity or None,
                name=name or run_dir.resolve().name,
                id=run_id,
                resume="allow",
                dir=wandb_dir,
                config=config,
            )
        except wandb.errors.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GPT2LabError(
                f"wandb could not start a run for train.wandb_project = {project!r}: {first} "
                "(run `wandb login`, or set WANDB_MODE=offline and `wandb sync` later)"
            ) from None
        self.id: str = self._run.id
        atomic_write_text(run_dir / WANDB_STATE_FILE, json.dumps({"id": self.id, "project": project}) + "\n")
        self._run.define_metric("step")
        for prefix in ("train", "eval", "samples"):
            self._run.define_metric(f"{prefix}/*", step_metric="step")
        history = read_metrics(run_dir) if resume and (run_dir / METRICS_FILE).is_file() else []
        self._samples = [[r.get("step"), r.get("prompt"), r.get("text")] for r in history if r.get("kind") == "sample"]
        self._wandb = wandb

    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record: its numbers for train and eval records, the table for samples."""
        kind, step = record.get("kind"), record.get("step")
        if kind in ("train", "eval"):
            values = {
                f"{kind}/{key}": value
                for key, value in record.items()
                if key not in ("kind", "step") and _number(value)
            }
            self._run.log({"step": step, **values})
        elif kind == "sample":
            # A new table with every sample so far: wandb shows the latest version of a logged table.
            self._samples.append([step, record.get("prompt"), record.get("text")])
            self._run.log({"step": step, "samples/text": self._wandb.Table(columns=SAMPLE_COLUMNS, data=self._samples)})

    def finish(self) -> None:
        self._run.finish()


def _number(value: Any) -> bool:
    """A value wandb charts: an int or float, bools excepted. NaN and inf are kept, as metrics.jsonl
    keeps them: a diverging loss is worth seeing."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
