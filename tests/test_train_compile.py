"""torch.compile and the training loop: one graph, compiled once, that evaluation never invalidates."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from train_utils import tiny_config, train_losses

from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT, Linear
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


def test_packing_leaves_unpacked_and_non_cpu_models_untouched():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    model = GPT(config).eval()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    before = [dict(vars(m)) for m in linears]
    assert not model.pack_for_cpu_inference(None)
    assert [dict(vars(m)) for m in linears] == before  # nothing was packed, nothing is touched
    if model.pack_for_cpu_inference(1):  # oneDNN packing exists in this build of torch
        assert all("packed" in vars(m) for m in linears)
    model.train()
    assert [vars(m).keys() for m in linears] == [d.keys() for d in before]  # the same dict as never packed

    with torch.device("meta"):
        elsewhere = GPT(config).eval()  # a model on a device that is not the CPU
    linears = [m for m in elsewhere.modules() if isinstance(m, Linear)]
    before = [dict(vars(m)) for m in linears]
    assert not elsewhere.pack_for_cpu_inference(1)
    assert [dict(vars(m)) for m in linears] == before


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_forward_and_loss_compile_to_one_graph(dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.1)).train()
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        explained = torch._dynamo.explain(model)(x, y, return_logits=False)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
