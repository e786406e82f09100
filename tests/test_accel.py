"""Speed applied from outside the model (gpt2lab.accel): packed weights and the fused loss compute what
the plain model computes, never go stale, leave the model as it was when undone, are chosen per machine
by measurement, and GPT2LAB_ACCEL=0 leaves the plain model everywhere."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from gpt2lab import accel
from gpt2lab.accel import packing, tuning
from gpt2lab.accel.packing import PackedLinear, TransposedLinear
from gpt2lab.config import GPTConfig
from gpt2lab.generate import SamplingParams, generate
from gpt2lab.model import GPT


def tiny_gpt(seed=0, **shape):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=300) | shape
    return GPT(GPTConfig(**cfg)).eval()


def copied_modules(model):
    return [name for name, m in model.named_modules() if isinstance(m, (PackedLinear, TransposedLinear))]


def can_pack() -> bool:
    return accel.pack_for_inference(tiny_gpt(), 2, layout="packed") == "packed"


@pytest.mark.parametrize("layout", ["transposed", "packed"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_each_layout_gives_the_plain_outputs_and_keeps_the_parameters(layout, dtype, atol):
    model = tiny_gpt(block_size=16, vocab_size=100).to(dtype)
    idx = torch.randint(0, 100, (3, 16))
    names = list(model.state_dict())
    params = list(model.parameters())
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        plain, _ = model(idx)
    # Where this build of torch cannot pack (oneDNN), the model keeps running on the plain weights, exactly.
    if accel.pack_for_inference(model, 3, layout=layout) == layout:
        assert len(copied_modules(model)) == len(linears) and accel.layout_of(model) == layout
        assert list(model.state_dict()) == names and list(model.parameters()) == params
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
        with torch.no_grad():
            laid_out, _ = model(idx)
        torch.testing.assert_close(laid_out.float(), plain.float(), rtol=0, atol=atol)
    else:
        assert layout == "packed" and copied_modules(model) == []
    logits, _ = model(idx)  # with autograd on, the parameters themselves are used
    assert logits.requires_grad
    accel.unpack(model)
    assert [m for m in model.modules() if type(m) is nn.Linear] == linears  # the very same modules back
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)


@pytest.mark.parametrize("layout", ["transposed", "packed"])
def test_copied_weights_never_go_stale(layout):
    model = tiny_gpt(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    idx = torch.randint(0, 40, (1, 8))
    used = accel.pack_for_inference(model, 1, layout=layout)  # where oneDNN declines: plain weights
    with torch.no_grad():
        before, _ = model(idx)
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an optimizer step would do the same
        changed, _ = model(idx)
        accel.unpack(model)
        expected, _ = model(idx)
    # The other layers still run on their copies in `changed`, whose products may round otherwise than the
    # plain ones in the last bit: equal to float32 rounding, and far from a stale copy.
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-6)
    assert (before - expected).abs().max() > 1e-3
    assert accel.pack_for_inference(model, 1, layout=layout) == used
    assert bool(copied_modules(model)) == (used != "plain")


def test_float16_is_never_packed_but_may_be_transposed():
    model = tiny_gpt().to(torch.float16)
    assert accel.pack_for_inference(model, 1, layout="packed") == "plain" and copied_modules(model) == []
    assert accel.pack_for_inference(model, 1, layout="transposed") == "transposed"
    with pytest.raises(ValueError, match="layout must be one of plain, transposed, packed, got 'tiled'"):
        accel.pack_for_inference(model, 1, layout="tiled")


def test_models_off_the_cpu_and_with_accel_off_stay_plain(monkeypatch):
    with torch.device("meta"):
        elsewhere = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)).eval()
    assert accel.pack_for_inference(elsewhere, 1) == "plain" and copied_modules(elsewhere) == []

    monkeypatch.setenv("GPT2LAB_ACCEL", "0")
    model = tiny_gpt()
    assert accel.pack_for_inference(model, 1, layout="transposed") == "plain" and copied_modules(model) == []
    assert accel.use_fused_loss(model) is model and "forward" not in vars(model)
    greedy = SamplingParams(temperature=0)
    out = generate(model, [1, 2, 3], 8, sampling=greedy)
    assert copied_modules(model) == []
    with torch.no_grad():  # the same tokens as a plain greedy loop over the model's forward
        seq = [1, 2, 3]
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out.tokens[0] == seq[3:]


def test_the_fused_loss_is_the_plain_loss_and_only_replaces_the_training_call():
    model = tiny_gpt(pad_vocab_multiple=64).train()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    y[0, :3] = -1
    logits, plain = model(x, y)
    accel.use_fused_loss(model)
    none, fused = model(x, y)
    assert none is None
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    again, loss = model(x)  # without targets: the model's own forward
    assert loss is None and torch.equal(again, model.head(model.hidden_states(x)))


# -- choosing per machine ------------------------------------------------------------------------------


@pytest.fixture
def fake_decode(monkeypatch):
    """Every model counts as big enough to time; the timing replaced by one in which the transposed
    weights win at batch 1 and the packed ones at other sizes. The calls are counted."""
    calls = []

    def timed(model, batch_size, rounds=5, context=32, layouts=packing.LAYOUTS):
        assert copied_modules(model) == []  # timed from the plain model
        calls.append(batch_size)
        fast = "transposed" if batch_size == 1 else "packed"
        return {lay: 0.02 if lay == fast else 0.03 for lay in layouts}

    monkeypatch.setattr(tuning, "DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(packing, "time_decode_step", timed)
    return calls


def test_decoding_takes_the_layout_measured_fastest_once_per_machine(fake_decode, offline_env, monkeypatch):
    if not can_pack():
        pytest.skip("this build of torch has no oneDNN packing")
    fake_decode.clear()
    assert accel.pack_for_inference(tiny_gpt(), 4) == "packed" and fake_decode == [4]
    model = tiny_gpt()
    assert accel.pack_for_inference(model, 1) == "transposed"
    assert fake_decode == [4, 1] and accel.layout_of(model) == "transposed"
    assert accel.pack_for_inference(model, 1) == "transposed" and fake_decode == [4, 1]  # decided: no second timing

    def refuse(self, linear, batch_size):
        raise AssertionError("packed although the cache says the transposed weights are faster")

    monkeypatch.setattr(PackedLinear, "__init__", refuse)
    again = tiny_gpt(seed=1)  # another model of the same shape: the cache answers, no timing
    assert accel.pack_for_inference(again, 1) == "transposed" and fake_decode == [4, 1]
    entries = json.loads((offline_env / "gpt2lab" / tuning.CACHE_NAME).read_text())
    assert sorted(e["layout"] for k, e in entries.items() if k.startswith("decode")) == ["packed", "transposed"]


def test_a_decoding_step_is_timed_in_every_layout_and_the_model_left_plain():
    model = tiny_gpt()
    accel.pack_for_inference(model, 2, layout="transposed")
    timings = packing.time_decode_step(model, 2, rounds=2)
    assert set(timings) == ({"plain", "transposed", "packed"} if can_pack() else {"plain", "transposed"})
    assert all(0 < t < 5 for t in timings.values())
    assert copied_modules(model) == [] and accel.layout_of(model) == "plain"


def test_a_transposed_copy_serves_every_batch_size_without_copying_again(fake_decode, monkeypatch):
    assert accel.pack_for_inference(tiny_gpt(seed=1), 1) == "transposed" and fake_decode == [1]  # now cached
    model = tiny_gpt()
    assert accel.pack_for_inference(model, 3, layout="transposed") == "transposed"
    copies = [m.copy for m in model.modules() if isinstance(m, TransposedLinear)]

    def refuse(self, linear, batch_size):
        raise AssertionError("copied again")

    monkeypatch.setattr(TransposedLinear, "__init__", refuse)
    assert accel.pack_for_inference(model, 1) == "transposed" and fake_decode == [1]  # the cache answers
    assert [m.copy for m in model.modules() if isinstance(m, TransposedLinear)] == copies
    assert accel.pack_for_inference(model, 5, layout="transposed") == "transposed"
    assert {m.batch_size for m in model.modules() if isinstance(m, TransposedLinear)} == {5}


@pytest.mark.parametrize("layout", ["transposed", "packed"])
def test_a_copy_of_a_laid_out_model_is_plain_and_tied(layout):
    model = tiny_gpt()
    accel.pack_for_inference(model, 2, layout=layout)
    twin = copy.deepcopy(model)
    assert copied_modules(twin) == [] and twin.lm_head.weight is twin.transformer.wte.weight
    assert twin.lm_head.weight is not model.lm_head.weight
    idx = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(twin(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-6)
