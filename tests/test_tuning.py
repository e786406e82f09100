"""The float32 CPU loss's kernels (chunk size, exponential): each is exact, the fastest is measured once
per machine and cached, and a training run records the one it used and keeps it when resumed."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from train_utils import tiny_config, train_losses

from gpt2lab import accel
from gpt2lab import checkpoint as ckpt
from gpt2lab.accel import tuning
from gpt2lab.accel.loss import CpuLossKernel, linear_cross_entropy
from gpt2lab.errors import GPT2LabError
from gpt2lab.train import train

FASTEST = CpuLossKernel(128, "exp", "token-major")
KERNELS = [
    CpuLossKernel(c, e, lay) for c in (16, 128) for e in ("exp2", "exp") for lay in ("vocab-major", "token-major")
]


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_every_kernel_gives_the_plain_loss_and_gradients(kernel):
    torch.manual_seed(0)
    hidden = torch.randn(150, 32, requires_grad=True)  # 150 rows: the last chunk is partial
    weight = (0.3 * torch.randn(1024, 32)).requires_grad_()  # 1000 tokens and 24 padding rows
    targets = torch.randint(0, 1000, (150,))
    targets[:7] = -1
    expected = F.cross_entropy((hidden @ weight.t())[:, :1000], targets, ignore_index=-1)
    gh, gw = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, 1000, kernel=kernel)
    fh, fw = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-7)
    assert torch.all(fw[1000:] == 0)


@pytest.mark.parametrize("row", [3, 10], ids=["first-chunk", "second-chunk"])
@pytest.mark.parametrize("kernel", [CpuLossKernel(8, "exp2"), CpuLossKernel(8, "exp", "token-major")], ids=str)
def test_a_chunk_that_overflows_is_recomputed(kernel, row):
    torch.manual_seed(0)
    hidden, weight = torch.randn(24, 16), 0.1 * torch.randn(64, 16)
    weight[7] = 0.0
    weight[7, 0] = 20.0
    hidden[row] = 0.0
    hidden[row, 0] = 10.0  # a logit 200 above the target's: exp overflows float32 (exp2 of 288 too)
    targets = torch.randint(8, 60, (24,))
    hidden.requires_grad_()
    weight.requires_grad_()
    expected = F.cross_entropy((hidden @ weight.t())[:, :60], targets)
    loss = linear_cross_entropy(hidden, weight, targets, 60, kernel=kernel)
    assert expected.item() > 200 / 24
    torch.testing.assert_close(loss, expected)
    fh, fw = torch.autograd.grad(loss, (hidden, weight))
    gh, gw = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)
    assert torch.all(fw[60:] == 0)


def test_a_bad_kernel_is_refused_with_its_fields():
    with pytest.raises(GPT2LabError, match="exp must be one of exp2, exp, got 'expm1'"):
        CpuLossKernel(chunk=128, exp="expm1")
    with pytest.raises(GPT2LabError, match="chunk must be a positive integer, got 0"):
        CpuLossKernel(chunk=0)
    with pytest.raises(GPT2LabError, match="layout must be one of vocab-major, token-major, got 'rows'"):
        CpuLossKernel(layout="rows")
    with pytest.raises(GPT2LabError, match=r"expected \{'chunk': N"):
        CpuLossKernel.from_dict({"chunk": 128, "exp": "exp"})
    d = {"chunk": 128, "exp": "exp", "layout": "token-major"}
    assert CpuLossKernel.from_dict(d) == CpuLossKernel(128, "exp", "token-major")
    assert CpuLossKernel.from_dict(d).to_dict() == d


def test_measure_times_every_candidate_on_the_shape():
    timings = tuning.measure(n_embd=16, vocab_size=500, padded_vocab=512, tokens=200, rounds=1)
    # chunks 256 (cut to the 200 tokens there are) and 128; the default's settings first
    assert list(timings) == [
        CpuLossKernel(c, e, lay) for lay in ("vocab-major", "token-major") for c in (200, 128) for e in ("exp2", "exp")
    ]
    assert all(0 < t < 10 for t in timings.values())


@pytest.fixture
def fake_timings(monkeypatch):
    """tuning.measure replaced: FASTEST is; the calls are counted."""
    calls = []

    def measure(n_embd, vocab_size, padded_vocab, tokens, rounds=tuning.ROUNDS):
        calls.append((n_embd, vocab_size, padded_vocab, tokens))
        return {k: 0.2 if k == FASTEST else 0.3 for k in tuning.candidates(tokens)}

    monkeypatch.setattr(tuning, "measure", measure)
    return calls


def test_the_fastest_is_measured_once_then_read_from_the_cache(fake_timings, offline_env, monkeypatch):
    kernel, how = tuning.choose_cpu_loss_kernel(128, 50257, 50304, 1024)
    assert kernel == FASTEST and how.startswith("measured now")
    assert fake_timings == [(128, 50257, 50304, 512)]  # at most 512 tokens per timed call
    cache = offline_env / "gpt2lab" / tuning.CACHE_NAME
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["chunk"] == 128 and entry["exp"] == "exp" and entry["layout"] == "token-major"
    assert entry["ms"]["chunks of 128 tokens, exp, token-major"] == 200.0

    kernel, how = tuning.choose_cpu_loss_kernel(128, 50257, 50304, 1024)
    assert kernel == FASTEST and how.startswith("measured earlier")
    assert len(fake_timings) == 1

    # what the timing depends on is in the key: another ISA limit or shape is measured afresh
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2")
    tuning.choose_cpu_loss_kernel(128, 50257, 50304, 1024)
    tuning.choose_cpu_loss_kernel(256, 50257, 50304, 1024)
    assert len(fake_timings) == 3
    assert len(json.loads(cache.read_text())) == 3


def test_an_unreadable_cache_is_measured_again_and_rewritten(fake_timings, offline_env):
    cache = offline_env / "gpt2lab" / tuning.CACHE_NAME
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    assert tuning.choose_cpu_loss_kernel(128, 50257, 50304, 1024)[0] == FASTEST
    assert len(json.loads(cache.read_text())) == 1
    key = next(iter(json.loads(cache.read_text())))
    cache.write_text(json.dumps({key: {"chunk": -3, "exp": "exp"}}))  # an entry that is no kernel
    assert tuning.choose_cpu_loss_kernel(128, 50257, 50304, 1024)[0] == FASTEST
    assert len(fake_timings) == 2


def test_small_shapes_take_the_default_without_timing(fake_timings, offline_env):
    kernel, how = tuning.choose_cpu_loss_kernel(32, 50257, 50304, 64)
    assert kernel == CpuLossKernel() and "too small" in how
    assert fake_timings == [] and not (offline_env / "gpt2lab" / tuning.CACHE_NAME).exists()


def run_meta(run_dir, step):
    return json.loads((ckpt.checkpoint_dir(run_dir, step) / ckpt.META_FILE).read_text())["training"]


@pytest.mark.usefixtures("one_thread")
def test_a_run_records_its_kernel_and_a_resumed_run_keeps_it(corpus, tmp_path, monkeypatch):
    chosen = CpuLossKernel(8, "exp", "token-major")  # 8-token chunks: the tiny model's 64-token batches take 8 of them
    monkeypatch.setattr(accel, "choose_cpu_loss_kernel", lambda *shape: (chosen, "chosen by the test"))
    straight = train(tiny_config(corpus, tmp_path / "straight"), progress=False)
    part = train(tiny_config(corpus, tmp_path / "resumed"), stop_at=5, progress=False)
    assert run_meta(tmp_path / "resumed", 4)["cpu_loss_kernel"] == chosen.to_dict()

    def refuse(*shape):
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(accel, "choose_cpu_loss_kernel", refuse)
    rest = train(tiny_config(corpus, tmp_path / "resumed"), resume="auto", progress=False)
    assert (straight.step, part.step, rest.step) == (8, 5, 8)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert run_meta(tmp_path / "resumed", 8)["cpu_loss_kernel"] == chosen.to_dict()
    events = [
        json.loads(line)["message"]
        for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "event"
    ]
    assert "float32 CPU loss: chunks of 8 tokens, exp, token-major; kept from" in " ".join(events)


@pytest.mark.usefixtures("one_thread")
def test_the_kernel_changes_the_rounding_only(corpus, tmp_path, monkeypatch):
    # Two kernels train the same model to the same losses, up to float32 rounding over 8 steps.
    losses = {}
    for kernel in (CpuLossKernel(8, "exp", "token-major"), CpuLossKernel(64, "exp2")):
        monkeypatch.setattr(accel, "choose_cpu_loss_kernel", lambda *shape, k=kernel: (k, "test"))
        train(tiny_config(corpus, tmp_path / str(kernel.chunk)), progress=False)
        losses[kernel] = [loss for _, loss in train_losses(tmp_path / str(kernel.chunk))]
    a, b = losses.values()
    assert a != b  # not the same bits,
    assert a == pytest.approx(b, rel=1e-4)  # but the same training


def test_small_models_take_the_default_layout_untimed(offline_env):
    def refuse():
        raise AssertionError("a tiny model was timed")

    assert tuning.decode_layout("float32 | 2 layers x 32 wide, vocab 300", 10**6, 1, refuse) == tuning.DECODE_DEFAULT
    assert not (offline_env / "gpt2lab" / tuning.CACHE_NAME).exists()
