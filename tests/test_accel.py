"""Speed applied from outside the model (gpt2lab.accel): packed weights and the fused loss compute what
the plain model computes, never go stale, leave the model as it was when undone, are chosen per machine
by measurement, and GPT2LAB_ACCEL=0 leaves the plain model everywhere."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from gpt2lab import accel
from gpt2lab.accel import packing, tuning
from gpt2lab.accel.packing import PackedLinear
from gpt2lab.config import GPTConfig
from gpt2lab.generate import SamplingParams, generate
from gpt2lab.model import GPT


def tiny_gpt(seed=0, **shape):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=300) | shape
    return GPT(GPTConfig(**cfg)).eval()


def packed_modules(model):
    return [name for name, m in model.named_modules() if isinstance(m, PackedLinear)]


def can_pack() -> bool:
    return accel.pack_for_inference(tiny_gpt(), 2)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_weights_give_the_plain_outputs_and_the_same_parameters(dtype, atol):
    model = tiny_gpt(block_size=16, vocab_size=100).to(dtype)
    idx = torch.randint(0, 100, (3, 16))
    names = list(model.state_dict())
    params = list(model.parameters())
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        plain, _ = model(idx)
    # Whether oneDNN packs a dtype depends on the CPU (bf16 needs AVX512-BF16 or AMX in some builds):
    # where packing declines, the model keeps running on the plain weights, exactly.
    if accel.pack_for_inference(model, 3):
        assert len(packed_modules(model)) == len(linears)
        assert list(model.state_dict()) == names and list(model.parameters()) == params
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
        with torch.no_grad():
            packed, _ = model(idx)
        torch.testing.assert_close(packed.float(), plain.float(), rtol=0, atol=atol)
    else:
        assert packed_modules(model) == []
    logits, _ = model(idx)  # with autograd on, the parameters themselves are used
    assert logits.requires_grad
    accel.unpack(model)
    assert [m for m in model.modules() if type(m) is nn.Linear] == linears  # the very same modules back
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)


def test_packed_weights_never_go_stale():
    model = tiny_gpt(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    idx = torch.randint(0, 40, (1, 8))
    packs = accel.pack_for_inference(model, 1)  # where oneDNN declines, all below runs on plain weights
    with torch.no_grad():
        before, _ = model(idx)
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an optimizer step would do the same
        changed, _ = model(idx)
        accel.unpack(model)
        expected, _ = model(idx)
    # The other layers still run packed in `changed`, whose products may round otherwise than the plain
    # ones in the last bit: equal to float32 rounding, and far from a stale pack.
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-6)
    assert (before - expected).abs().max() > 1e-3
    assert accel.pack_for_inference(model, 1) == packs
    assert bool(packed_modules(model)) == packs
    assert not accel.pack_for_inference(model.to(torch.float16), 1)  # not packed: plain kernels
    assert packed_modules(model) == []


def test_models_off_the_cpu_and_with_accel_off_stay_plain(monkeypatch):
    with torch.device("meta"):
        elsewhere = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)).eval()
    assert not accel.pack_for_inference(elsewhere, 1) and packed_modules(elsewhere) == []

    monkeypatch.setenv("GPT2LAB_ACCEL", "0")
    model = tiny_gpt()
    assert not accel.pack_for_inference(model, 1) and packed_modules(model) == []
    assert accel.use_fused_loss(model) is model and "forward" not in vars(model)
    greedy = SamplingParams(temperature=0)
    out = generate(model, [1, 2, 3], 8, sampling=greedy)
    assert packed_modules(model) == []
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
    """Every model counts as big enough to time; the timing replaced by one in which the plain weights
    win at batch 1 and the packed ones at other sizes. The calls are counted."""
    calls = []

    def timed(model, batch_size, rounds=3, context=32):
        assert packed_modules(model)  # what is timed against the plain weights is packed already
        calls.append(batch_size)
        return {"packed": 0.03, "plain": 0.02} if batch_size == 1 else {"packed": 0.02, "plain": 0.03}

    monkeypatch.setattr(tuning, "DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(packing, "time_decode_step", timed)
    return calls


def test_decoding_keeps_the_plain_weights_where_they_are_faster(fake_decode, offline_env, monkeypatch):
    if not accel.pack_for_inference(tiny_gpt(), 4):
        pytest.skip("this build of torch has no oneDNN packing")
    assert fake_decode == [4]
    model = tiny_gpt()
    assert accel.pack_for_inference(model, 1) is False
    assert fake_decode == [4, 1] and packed_modules(model) == []
    assert accel.pack_for_inference(model, 1) is False and fake_decode == [4, 1]  # decided: no second timing

    def refuse(self, linear, batch_size):
        raise AssertionError("packed although the cache says the plain weights are faster")

    monkeypatch.setattr(PackedLinear, "__init__", refuse)
    again = tiny_gpt(seed=1)  # another model of the same shape: the cache answers, nothing is packed
    assert accel.pack_for_inference(again, 1) is False and fake_decode == [4, 1]
    entries = json.loads((offline_env / "gpt2lab" / tuning.CACHE_NAME).read_text())
    assert sorted(e["packed"] for k, e in entries.items() if k.startswith("decode")) == [False, True]


def test_a_decoding_step_is_timed_both_ways_and_the_packs_are_put_back():
    model = tiny_gpt()
    if not accel.pack_for_inference(model, 2):
        pytest.skip("this build of torch has no oneDNN packing")
    before = [m for m in model.modules() if isinstance(m, PackedLinear)]
    timings = packing.time_decode_step(model, 2, rounds=2)
    assert set(timings) == {"packed", "plain"} and all(0 < t < 5 for t in timings.values())
    assert [m for m in model.modules() if isinstance(m, PackedLinear)] == before
