"""One rank of a torchrun training job that also reports, after training, the bytes of the parameter,
gradient and optimizer tensors this rank holds, and how many graphs torch.compile made
(tests/test_train_fsdp.py).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py CONFIG.toml OUT_DIR_FOR_BYTES
    torchrun --nproc_per_node=2 tests/fsdp_worker.py CONFIG.toml - --kill-rank1-at STEP

With --kill-rank1-at, rank 1 sends itself SIGKILL while the checkpoint of step STEP is being written:
its DCP shards (and rank 0's) are in the temporary directory, which rank 0 has not yet completed
and renamed, the worst moment for a kill.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch._dynamo.utils import counters

from gpt2lab import distributed
from gpt2lab.fileio import atomic_write_text
from gpt2lab.train.config import load_train_config
from gpt2lab.train.loop import Trainer


def local_bytes(tensors) -> int:
    """Bytes of the tensors' local data (this rank's shard of a DTensor)."""
    return sum(getattr(t, "_local_tensor", t).nbytes for t in tensors)


def kill_rank1_while_saving(step: int) -> None:
    """Wrap dcp.save (which checkpoint.py looks up at each call) to SIGKILL rank 1 once its shards of
    the checkpoint of `step` are written."""
    save = dcp.save

    def save_then_die(state_dict, *, checkpoint_id, **kwargs):
        result = save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
        if torch.distributed.get_rank() == 1 and Path(checkpoint_id).parent.name.startswith(f".step_{step:08d}.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp.save = save_then_die


def main() -> None:
    torch.set_num_threads(1)
    config, out = sys.argv[1], Path(sys.argv[2])
    if sys.argv[3:4] == ["--kill-rank1-at"]:
        kill_rank1_while_saving(int(sys.argv[4]))
    trainer = Trainer(load_train_config(config), progress=False)
    trainer.run()
    if sys.argv[3:4] == ["--kill-rank1-at"]:
        raise AssertionError(f"rank {trainer.env.rank} finished the run: rank 1 was not killed")
    # One more backward, for gradients to measure (the step leaves none: zero_grad(set_to_none=True)).
    t = trainer.cfg.train
    x, y = torch.randint(0, trainer.tokenizer.n_vocab, (2, t.batch_size, t.seq_len))
    _, loss = trainer.train_model(x, y)
    loss.backward()
    params = list(trainer.model.parameters())
    held = {
        "parameters": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params),
        "optimizer": local_bytes(v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"),
        # Graphs torch.compile made (train.compile): 0 would mean the run was eager throughout.
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
    }
    atomic_write_text(out / f"bytes_rank{trainer.env.rank}.json", json.dumps(held))
    distributed.teardown()


if __name__ == "__main__":
    main()
