"""Decoding in each weight layout and inference dtype (gpt2lab.accel): float32 layouts give the plain
model's greedy tokens and its logits to float32 rounding; bfloat16 and int8 weights stay within stated
tolerances of float32; `--dtype int8` works in sample, eval and the Python API, with one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab import accel
from gpt2lab.accel.int8 import Int8Linear, quantize_rows
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.generate import SamplingParams, generate
from gpt2lab.model import GPT

GREEDY = SamplingParams(temperature=0)
LAYOUTS = ["plain", "transposed", "packed"]


@pytest.fixture
def wide(models):
    """`models`' gpt2lab twin (weights spread wide, GPT-2's vocabulary), a fresh copy per test."""
    return copy.deepcopy(models[1]).eval()


def held_out(model: GPT, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (rows, 64), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_every_layout_decodes_the_plain_models_greedy_tokens(wide, layout, batch, monkeypatch):
    prompt = list(range(500, 540))  # 40 tokens and 40 more: the 64-token window slides
    with monkeypatch.context() as m:
        m.setenv("GPT2LAB_ACCEL", "0")
        plain = generate(wide, prompt, 40, sampling=GREEDY, num_samples=batch)
    accel.pack_for_inference(wide, batch, layout=layout)
    ours = generate(wide, prompt, 40, sampling=GREEDY, num_samples=batch)
    assert ours.stats.slides == plain.stats.slides == 1
    assert ours.tokens == plain.tokens


def test_gpt2_wide_layers_give_the_plain_logits_to_float32_rounding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768, block_size=16, vocab_size=50257)).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        plain, _ = model(idx)
        for layout in ("transposed", "packed"):
            if accel.pack_for_inference(model, 2, layout=layout) == layout:
                torch.testing.assert_close(model(idx)[0], plain, rtol=1e-5, atol=1e-5)


def test_int8_rows_round_each_weight_to_half_a_step_of_its_channel():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different sizes
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))  # each row's largest is 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("kernel,reduce_range", [("dynamic", False), ("dynamic", True), ("weight-only", False)])
def test_an_int8_linear_is_the_float_product_within_its_rounding(kernel, reduce_range):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(5, 3, 256)
    try:
        int8 = Int8Linear(linear, reduce_range, kernel)
        with torch.no_grad():
            y = int8(x)
    except RuntimeError:
        pytest.skip(f"this build of torch has no {kernel} int8 kernel")
    with torch.no_grad():
        exact = linear(x)
    assert y.shape == (5, 3, 96) and y.dtype == torch.float32
    # Bound of the rounding: each weight is off by at most half its channel's step, and with 8-bit
    # activations (one scale over the input's range, 7 bits with reduce_range) each input by half of its.
    q, scales = quantize_rows(linear.weight)
    levels = 127 if reduce_range else 255
    x_step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels if kernel == "dynamic" else 0.0
    bound = x.abs().sum(-1, keepdim=True) * scales / 2 + linear.weight.abs().sum(-1) * x_step / 2  # (5, 3, 96)
    err = (y - exact).abs()
    assert (err <= bound * 1.01 + 1e-5).all()
    assert err.max() > 1e-4  # not the float product itself


@pytest.mark.parametrize(
    "mode,max_diff,top1",
    [("bfloat16", 0.15, 0.95), ("int8", 0.4, 0.90), ("int8-7bit", 0.6, 0.85), ("int8-weight-only", 0.3, 0.92)],
)
def test_bf16_and_int8_logits_stay_within_tolerance_of_float32(wide, mode, max_diff, top1):
    """Stated tolerances on 256 positions of a 2-layer model with GPT-2's vocabulary (logits spread
    about 1.1, largest about 6): the largest logit difference and the top-1 agreement with float32."""
    idx = held_out(wide)
    with torch.no_grad():
        ref, _ = wide(idx)
        if mode == "bfloat16":
            wide.to(torch.bfloat16)
        else:
            kernel = "weight-only" if mode == "int8-weight-only" else None
            try:
                accel.quantize_int8(wide, reduce_range=mode == "int8-7bit", kernel=kernel)
            except GPT2LabError:
                pytest.skip("this build of torch cannot multiply int8 weights")
        out = wide(idx)[0].float()
    assert (out - ref).abs().max() <= max_diff
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= top1
    assert not torch.equal(out, ref)


def test_int8_through_the_python_api_decodes_and_keeps_the_parameters(wide):
    names, params = list(wide.state_dict()), list(wide.parameters())
    prompt = list(range(100, 120))
    float_tokens = generate(wide, prompt, 24, sampling=GREEDY).tokens
    assert accel.quantize_int8(wide) is wide and accel.is_int8(wide)
    assert list(wide.state_dict()) == names and list(wide.parameters()) == params
    assert accel.pack_for_inference(wide, 1) == "plain"  # no nn.Linear left to lay out
    tokens = generate(wide, prompt, 24, sampling=GREEDY, num_samples=2).tokens
    assert tokens[0] == tokens[1]
    agree = sum(a == b for a, b in zip(tokens[0], float_tokens[0]))
    assert agree >= 20, (tokens[0], float_tokens[0])  # 24 tokens: greedy paths may part near a tie
    twin = copy.deepcopy(wide)
    assert accel.is_int8(twin) and twin.lm_head.weight is twin.transformer.wte.weight
    assert generate(twin, prompt, 24, sampling=GREEDY).tokens[0] == tokens[0]
    with pytest.raises(ValueError, match="kernel must be 'dynamic' or 'weight-only', got 'int4'"):
        Int8Linear(nn.Linear(4, 4), kernel="int4")
    accel.dequantize(wide)
    assert not accel.is_int8(wide) and generate(wide, prompt, 24, sampling=GREEDY).tokens == float_tokens


def test_int8_is_refused_in_one_line_for_other_dtypes_and_with_accel_off(wide, monkeypatch):
    with pytest.raises(
        GPT2LabError, match=r"int8 weights are made from a float32 model on the CPU, not torch\.bfloat16"
    ):
        accel.quantize_int8(wide.to(torch.bfloat16))
    monkeypatch.setenv("GPT2LAB_ACCEL", "0")
    with pytest.raises(GPT2LabError, match=r"^--dtype int8 needs gpt2lab's accelerations: unset GPT2LAB_ACCEL=0$"):
        accel.apply_inference_dtype(wide.float(), "int8")
    assert accel.inference_dtype("int8") == "float32" and accel.inference_dtype("bfloat16") == "bfloat16"


def test_sample_and_eval_take_dtype_int8(cli, hf_dir, tmp_path, monkeypatch):
    args = ["sample", "--model", hf_dir, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"]
    result = cli(*args, "--dtype", "int8", "--device", "cpu")
    assert result.code == 0, result.err
    assert result.out.startswith("Hello") and "8 tokens x 1 sample(s)" in result.err
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "ppl.json"
    ev = cli("eval", "--model", hf_dir, "--task", "perplexity", "--data", text, "--dtype", "int8", "--device", "cpu",
             "--json", out, "--no-progress")  # fmt: skip
    assert ev.code == 0, ev.err
    report = json.loads(out.read_text())
    assert report["run"]["dtype"] == "int8"
    monkeypatch.setenv("GPT2LAB_ACCEL", "0")
    off = cli(*args, "--dtype", "int8", "--device", "cpu")
    assert off.code != 0 and off.err.strip().splitlines()[-1].endswith(
        "--dtype int8 needs gpt2lab's accelerations: unset GPT2LAB_ACCEL=0"
    )


def test_an_int8_product_matches_f_linear_on_dequantized_weights_exactly_without_activation_rounding():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    try:
        int8 = Int8Linear(linear, kernel="weight-only")
        x = torch.randn(4, 64)
        y = int8(x)
    except RuntimeError:
        pytest.skip("this build of torch has no weight-only int8 kernel")
    q, scales = quantize_rows(linear.weight)
    torch.testing.assert_close(y, F.linear(x, q.float() * scales[:, None], linear.bias), rtol=1e-5, atol=1e-5)


def test_the_decoding_commands_ask_for_the_short_openmp_spin(cli, monkeypatch, tmp_path):
    import gpt2lab.cli as gpt2lab_cli

    asked = []
    monkeypatch.setattr(gpt2lab_cli, "spin_briefly_before_torch", lambda: asked.append(True))
    assert cli("sample", "--model", tmp_path / "missing", "--device", "cpu").code != 0 and asked == [True]
    assert cli("chat", "--model", tmp_path / "missing", "--device", "cpu").code != 0 and asked == [True, True]
    assert gpt2lab_cli.OPENMP_COMMANDS == ("train", "eval", "sample", "serve", "chat")
