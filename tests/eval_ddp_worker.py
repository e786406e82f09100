"""Run under torchrun by test_eval_ddp.py: every evaluation sharded over the ranks of a gloo group.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/eval_ddp_worker.py SPEC.json

SPEC gives the model directory, the data and the output directory. Perplexity and validation loss run
through the library, then HellaSwag through the `gpt2lab eval` command itself (which also closes the
process group). Every rank writes library_rank{r}.json; the command writes hellaswag.json from rank 0.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from gpt2lab.checkpoint import load_model_and_tokenizer
from gpt2lab.cli import main as cli_main
from gpt2lab.distributed import setup
from gpt2lab.eval import perplexity, val_loss
from gpt2lab.eval.common import EvalContext
from gpt2lab.fileio import atomic_write_json


def run(spec: dict) -> int:
    info = setup("cpu")
    device = info.device
    model, tok = load_model_and_tokenizer(spec["model"], device=device)
    out = Path(spec["out"])
    ctx = EvalContext(rank=info.rank, world_size=info.world_size)
    ppl = perplexity.evaluate(model, tok.encode(spec["text"]), replace(ctx, batch_size=3), context=16, stride=5)
    vl = val_loss.val_loss(
        model, spec["val_dir"], replace(ctx, batch_size=2), max_tokens=spec["val_tokens"], seq_len=16, tokenizer=tok
    )
    # Each rank writes what it got: all ranks must return the same numbers.
    record = {"perplexity": ppl.to_dict(), "val_loss": vl.to_dict()}
    atomic_write_json(out / f"library_rank{info.rank}.json", record)
    return cli_main(
        ["eval", "--model", spec["model"], "--task", "hellaswag", "--data", spec["items"], "--batch-size", "2",
         "--device", "cpu", "--no-progress", "--json", str(out / "hellaswag.json")]
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(json.loads(Path(sys.argv[1]).read_text())))
