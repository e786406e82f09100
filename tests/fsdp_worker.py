"""One rank of a torchrun training job that also reports, after training, the bytes of the parameter,
gradient and optimizer tensors this rank holds (tests/test_train_fsdp.py).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py CONFIG.toml OUT_DIR_FOR_BYTES
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gpt2lab import distributed
from gpt2lab.fileio import atomic_write_text
from gpt2lab.train.config import load_train_config
from gpt2lab.train.loop import Trainer


def local_bytes(tensors) -> int:
    """Bytes of the tensors' local data (this rank's shard of a DTensor)."""
    return sum(getattr(t, "_local_tensor", t).nbytes for t in tensors)


def main() -> None:
    torch.set_num_threads(1)
    config, out = sys.argv[1], Path(sys.argv[2])
    trainer = Trainer(load_train_config(config), progress=False)
    trainer.run()
    # One more backward, for gradients to measure (the step leaves none: zero_grad(set_to_none=True)).
    t = trainer.cfg.train
    x, y = torch.randint(0, trainer.tokenizer.n_vocab, (2, t.batch_size, t.seq_len))
    _, loss = trainer.train_model(x, y, return_logits=False)
    loss.backward()
    params = list(trainer.model.parameters())
    held = {
        "parameters": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params),
        "optimizer": local_bytes(v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"),
    }
    atomic_write_text(out / f"bytes_rank{trainer.env.rank}.json", json.dumps(held))
    distributed.teardown()


if __name__ == "__main__":
    main()
