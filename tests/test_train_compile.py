"""torch.compile and the training loop: one graph, compiled once, that evaluation never invalidates."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from train_utils import tiny_config, train_losses

from gpt2lab.accel import use_fused_loss
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def strict_dynamo():
    """A fresh dynamo cache in which any recompile raises."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_evaluation_sample_checkpoint_and_resume_never_recompile(corpus, tmp_path, strict_dynamo):
    # Step 1, then val loss + a text sample (which packs the CPU weights for decoding and drops them
    # again), step 2, a checkpoint, then a resumed run in the same process (a new model object).
    sections = dict(
        # The eager backend traces as Inductor's front end does (the guards are dynamo's), without codegen.
        train={"compile": True, "compile_backend": "eager", "max_steps": 4},
        eval={"every": 1, "sample_tokens": 4},
        checkpoint={"every": 2},
    )
    part = train(tiny_config(corpus, tmp_path / "run", **sections), stop_at=2, progress=False)
    assert part.step == 2 and part.checkpoint.name == "step_00000002"
    rest = train(tiny_config(corpus, tmp_path / "run", **sections), resume="auto", progress=False)
    assert rest.step == 4
    assert [s for s, _ in train_losses(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_forward_and_loss_compile_to_one_graph(dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.1)
    model = use_fused_loss(GPT(config).train())  # as the trainer runs it; compiled, the plain loss
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        explained = torch._dynamo.explain(model)(x, y)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
