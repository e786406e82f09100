"""The evaluation skeleton: EvalContext's sharding rule and the distributed windowed sum."""

import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.eval import EvalContext
from gpt2lab.eval.common import windowed_sum
from gpt2lab.model import GPT


def tiny() -> GPT:
    return GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))


def test_context_shards_round_robin_and_checks_batch_size():
    assert EvalContext(rank=1, world_size=3).mine(8) == [1, 4, 7]
    assert EvalContext().mine(3) == [0, 1, 2]
    assert not EvalContext(rank=1, world_size=2, progress=True).show_progress  # rank 0 draws the bar
    assert EvalContext(progress=True).device_for(tiny()) == torch.device("cpu")
    with pytest.raises(GPT2LabError, match="batch size must be at least 1, got 0"):
        EvalContext(batch_size=0)
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 ranks"):
        EvalContext(rank=2, world_size=2)


def test_windowed_sum_fills_this_ranks_slots_batch_by_batch():
    model = tiny().train()
    seen: list[list[int]] = []

    def score(batch: list[int]) -> torch.Tensor:
        seen.append(batch)
        assert not model.training and torch.is_inference_mode_enabled()
        return torch.tensor(batch, dtype=torch.float32) + 0.5

    # Rank 1 of 2 owns windows 1, 3, 5, 7: two batches of 2. Without a process group nothing is
    # added from rank 0, so its slots stay 0.
    sums = windowed_sum(model, 8, EvalContext(rank=1, world_size=2, batch_size=2), score, "test")
    assert seen == [[1, 3], [5, 7]]
    assert sums.dtype == torch.float64
    assert sums.tolist() == [0, 1.5, 0, 3.5, 0, 5.5, 0, 7.5]
    assert model.training  # restored

    seen.clear()
    windowed_sum(model, 4, EvalContext(batch_size=3), score, "test", batches=lambda mine: [mine[:1], mine[1:]])
    assert seen == [[0], [1, 2, 3]]
