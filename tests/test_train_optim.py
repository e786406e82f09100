"""The optimizer pieces: LR schedule, parameter groups, saved AdamW state, the fused loss, overfitting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gpt2lab.accel import linear_cross_entropy, use_fused_loss
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train.config import OptimSection
from gpt2lab.train.optim import (
    MuonAdamW,
    build_optimizer,
    load_optimizer_state,
    lr_at,
    muon_param_groups,
    optimizer_state_tensors,
    orthogonalize,
    param_groups,
    set_lr,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = OptimSection()  # build-nanogpt: 6e-4 -> 6e-5, 715 warmup steps


def test_lr_schedule_build_nanogpt_values():
    max_steps = 19073
    assert lr_at(0, RECIPE, max_steps) == pytest.approx(6e-4 / 715)
    assert lr_at(99, RECIPE, max_steps) == pytest.approx(6e-4 * 100 / 715)
    assert lr_at(714, RECIPE, max_steps) == pytest.approx(6e-4)
    assert lr_at(715, RECIPE, max_steps) == pytest.approx(6e-4)
    midpoint = 715 + (max_steps - 715) // 2
    assert lr_at(midpoint, RECIPE, max_steps) == pytest.approx(3.3e-4, rel=1e-3)  # halfway down the cosine
    assert lr_at(max_steps, RECIPE, max_steps) == pytest.approx(6e-5)
    assert lr_at(max_steps + 100, RECIPE, max_steps) == pytest.approx(6e-5)
    lrs = [lr_at(s, RECIPE, max_steps) for s in range(0, max_steps, 7)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in itertools.pairwise(lrs[: peak + 1]))  # up during warmup
    assert all(a >= b for a, b in itertools.pairwise(lrs[peak:]))  # then only down


def test_lr_schedule_other_shapes():
    linear = OptimSection(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, linear, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    constant = OptimSection(lr=1.0, min_lr=0.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, constant, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=0)
    assert lr_at(5, cosine, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_param_groups_decay_matrices_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert "transformer.wte.weight" in decay["names"] and "transformer.wpe.weight" in decay["names"]
    assert "lm_head.weight" not in decay["names"]  # tied to wte: one parameter, decayed once
    assert (
        "transformer.h.0.ln_1.weight" in no_decay["names"] and "transformer.h.0.attn.c_attn.bias" in no_decay["names"]
    )
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(include_padding=True)
    assert len(decay["params"]) == 2 + 4 * 2  # wte, wpe + (c_attn, c_proj, c_fc, mlp c_proj) per layer


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_round_trip_is_exact(tmp_path, name):
    from safetensors.torch import load_file, save_file

    recipe = OptimSection(name=name)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64)
    model = GPT(cfg)
    opt = build_optimizer(model, recipe, torch.device("cpu"))
    x = torch.randint(0, 50257, (2, 8))
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = optimizer_state_tensors(opt)
    save_file(tensors, tmp_path / "opt.safetensors")
    if name == "muon":
        assert "transformer.h.0.mlp.c_fc.weight.momentum_buffer" in tensors
        assert "transformer.wte.weight.exp_avg" in tensors and "transformer.h.0.mlp.c_fc.weight.exp_avg" not in tensors
    clone = GPT.from_state_dict(cfg, {k: v.clone() for k, v in model.state_dict().items()})
    opt2 = build_optimizer(clone, recipe, torch.device("cpu"))
    load_optimizer_state(opt2, load_file(tmp_path / "opt.safetensors"), meta, "test")
    for model_, opt_ in ((model, opt), (clone, opt2)):
        model_(x, x)[1].backward()
        opt_.step()
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), name


def test_optimizer_state_of_the_other_optimizer_is_refused():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64)
    model = GPT(cfg)
    adamw = build_optimizer(model, RECIPE, torch.device("cpu"))
    muon = build_optimizer(model, OptimSection(name="muon"), torch.device("cpu"))
    _, meta = optimizer_state_tensors(adamw)
    with pytest.raises(GPT2LabError) as e:
        load_optimizer_state(muon, {}, meta, "ckpt")
    assert str(e.value) == (
        "ckpt: the optimizer state is adamw's and this run's optim.name is 'muon': "
        "resume with --set optim.name=adamw, or start a new run"
    )


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64))
    recipe = OptimSection(name="muon", lr=2e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.01)
    decay, no_decay, muon = muon_param_groups(model, recipe)
    assert decay["names"] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and muon["weight_decay"] == 0.01
    assert muon["muon"] and muon["names"] == [
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert sum(p.numel() for g in (decay, no_decay, muon) for p in g["params"]) == model.num_params(
        include_padding=True
    )
    opt = build_optimizer(model, recipe, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and [g["lr"] for g in opt.param_groups] == [2e-3, 2e-3, 0.02]
    set_lr(opt, 1e-3)  # the schedule scales both rates alike
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, pytest.approx(1e-2)]


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
def test_orthogonalize_is_near_the_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    # Five quintic steps leave the singular values between about 0.7 and 1.2, not at 1 (Jordan et al.).
    assert s.min() > 0.6 and s.max() < 1.25, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.98
    # A stack is orthogonalized matrix by matrix, each scaled by its own norm.
    both = orthogonalize(torch.stack([g, 3 * g]))
    torch.testing.assert_close(both[0], o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[1], o, rtol=0, atol=1e-6)  # up to eps in the norm


def _reference_muon(p, grads, lr, momentum, wd):
    """Muon written out for one matrix: the update each step, from the formula."""
    p, buf = p.clone(), torch.zeros_like(p)
    for g in grads:
        buf = momentum * buf + g
        u = g + momentum * buf
        x = u if u.size(0) <= u.size(1) else u.T
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x - 4.7750 * (a @ x) + 2.0315 * (a @ a @ x)
        o = x if u.size(0) <= u.size(1) else x.T
        p = p * (1 - lr * wd) - lr * max(1.0, p.size(0) / p.size(1)) ** 0.5 * o
    return p


def test_muon_step_matches_the_formula_and_adamw_steps_the_rest_as_plain_adamw():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = OptimSection(name="muon", lr=2e-3, muon_lr=0.02, muon_weight_decay=0.05)
    opt = build_optimizer(model, recipe, torch.device("cpu"))
    # The same AdamW, alone, over clones of the AdamW groups' parameters.
    adam_groups = [g for g in opt.param_groups if not g.get("muon")]
    clones = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in adam_groups]
    plain = torch.optim.AdamW(
        [{"params": c, "weight_decay": g["weight_decay"]} for c, g in zip(clones, adam_groups)],
        lr=2e-3,
        betas=(recipe.beta1, recipe.beta2),
        eps=recipe.eps,
        fused=True,
    )
    grads: dict[str, list[torch.Tensor]] = {}
    x = torch.randint(0, 50257, (2, 8))
    for _ in range(3):
        model(x, x)[1].backward()
        for n, p in model.named_parameters():
            grads.setdefault(n, []).append(p.grad.clone())
        for c, g in zip(clones, adam_groups):
            for cp, p in zip(c, g["params"]):
                cp.grad = p.grad.clone()
        opt.step()
        plain.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for c, g in zip(clones, adam_groups):
        for cp, n in zip(c, g["names"]):
            assert torch.equal(cp, params[n]), n  # bit for bit
    for n in opt.param_groups[2]["names"]:
        want = _reference_muon(start[n].double(), [g.double() for g in grads[n]], 0.02, 0.95, 0.05)
        torch.testing.assert_close(params[n].double(), want, rtol=0, atol=2e-6)
        assert not torch.equal(params[n], start[n])


def test_fused_loss_matches_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)  # 37 rows: the last chunk is partial
    weight = (0.1 * torch.randn(64, 16)).requires_grad_()  # 60 real tokens + 4 padding rows
    targets = torch.randint(0, 60, (37,))
    targets[:5] = -1
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :60], targets, ignore_index=-1)
    gh, gw = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, vocab_size=60, chunk=8)
    fh, fw = torch.autograd.grad(2.0 * loss, (hidden, weight))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fh, 2 * gh)
    torch.testing.assert_close(fw, 2 * gw)
    assert torch.all(fw[60:] == 0)  # padding rows get no gradient


def _plain_and_fused(hidden, weight, targets, vocab, chunk):
    expected = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :vocab], targets, ignore_index=-1)
    gh, gw = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, vocab_size=vocab, chunk=chunk)
    fh, fw = torch.autograd.grad(loss, (hidden, weight))
    return (expected, gh, gw), (loss, fh, fw)


def test_fused_loss_recomputes_a_chunk_whose_logits_overflow_the_target_shift():
    # The float32 CPU path shifts each softmax by the target's logit; a logit more than 88 above it
    # overflows exp() in float32, and that chunk (rows 8-15 here) must take the max-shifted way.
    torch.manual_seed(0)
    hidden = torch.randn(24, 16)
    weight = 0.1 * torch.randn(64, 16)
    weight[7] = 0.0
    weight[7, 0] = 20.0
    hidden[10] = 0.0
    hidden[10, 0] = 10.0  # logit 200 for token 7; the target is another token, a loss near 200 nats
    targets = torch.randint(8, 60, (24,))
    hidden.requires_grad_()
    weight.requires_grad_()
    (expected, gh, gw), (loss, fh, fw) = _plain_and_fused(hidden, weight, targets, 60, 8)
    assert expected.item() > 200 / 24  # the row's loss is in the mean
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)


def test_fused_loss_in_float64_takes_the_max_shifted_path_and_matches():
    # Anything but float32 on a CPU (float64 here; bf16 autocast and GPUs alike) uses the max-shifted
    # softmax, with grad_w updated two chunks at a time.
    torch.manual_seed(1)
    hidden = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    weight = (0.1 * torch.randn(64, 16, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 60, (29,))
    targets[3:6] = -1
    (expected, gh, gw), (loss, fh, fw) = _plain_and_fused(hidden, weight, targets, 60, 4)
    torch.testing.assert_close(loss.double(), expected)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)


def test_model_training_path_matches_logits_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64))
    x, y = torch.randint(0, 50257, (3, 8)), torch.randint(0, 50257, (3, 8))
    logits, plain = model(x, y)
    none, fused = use_fused_loss(model)(x, y)
    assert none is None and logits.shape == (3, 8, 50257)
    torch.testing.assert_close(fused, plain)


def test_model_gradients_of_the_fused_loss_match_the_logits_path_and_are_not_aliased():
    # loss.backward() hands the fused loss's precomputed gradients over as they are (no multiply by 1);
    # the tied embedding's gradient adds the lookup's to them, and a second backward through the same
    # graph must add the same again: nothing handed over may have been changed in place.
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64))
    x, y = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    model(x, y)[1].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused = use_fused_loss(model)(x, y)[1]
    fused.backward(retain_graph=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)
    fused.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = use_fused_loss(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, pad_vocab_multiple=64)))
    opt = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(0, 50257, (4, 17))
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.1
