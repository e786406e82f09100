"""The training state's components: each state_dict() / load_state_dict() pair restores exactly."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train.build import empty_model
from gpt2lab.train.config import OptimSection
from gpt2lab.train.optim import Schedule, build_optimizer, lr_at
from gpt2lab.train.state import Counters, ModelState, OptimizerState, RNGState

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, pad_vocab_multiple=64)


def trained_pair(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    opt = build_optimizer(model, OptimSection(), torch.device("cpu"))
    x = torch.randint(0, CONFIG.vocab_size, (2, 8))
    for _ in range(2):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_model_state_copies_into_the_same_parameters_bit_for_bit():
    source, _ = trained_pair()
    target = empty_model(CONFIG, "cpu")
    params = list(target.parameters())
    ModelState(target).load_state_dict(ModelState(source).state_dict())
    assert all(a is b for a, b in zip(params, target.parameters()))  # an optimizer over them stays attached
    assert target.lm_head.weight is target.transformer.wte.weight  # still tied
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randint(0, CONFIG.vocab_size, (1, 8))
    assert torch.equal(source.eval()(x)[0], target.eval()(x)[0])
    assert "lm_head.weight" not in ModelState(source).state_dict()  # the tied matrix is stored once


def test_model_state_names_a_missing_or_misshapen_weight():
    weights = ModelState(GPT(CONFIG)).state_dict()
    target = ModelState(GPT(CONFIG))
    with pytest.raises(GPT2LabError, match=r"missing weight transformer\.wpe\.weight"):
        target.load_state_dict({k: v for k, v in weights.items() if k != "transformer.wpe.weight"})
    with pytest.raises(GPT2LabError, match=r"unexpected weight extra\.bias"):
        target.load_state_dict({**weights, "extra.bias": torch.zeros(1)})
    with pytest.raises(
        GPT2LabError, match=r"weight transformer\.wpe\.weight has shape \[4, 16\], the model's is \[8, 16\]"
    ):
        target.load_state_dict({**weights, "transformer.wpe.weight": torch.zeros(4, 16)})


def test_optimizer_state_round_trip_continues_exactly():
    model, opt = trained_pair()
    # state_dict() hands out the live tensors, as torch's own do: a copy stands for the saved file.
    saved_weights, saved_opt = copy.deepcopy((ModelState(model).state_dict(), OptimizerState(opt).state_dict()))
    assert saved_opt["tensors"]["transformer.wte.weight.exp_avg"].shape == (50304, 16)
    assert [g["names"][:1] for g in saved_opt["param_groups"]] == [
        ["transformer.wte.weight"],
        ["transformer.h.0.ln_1.weight"],
    ]
    clone = empty_model(CONFIG, "cpu")
    ModelState(clone).load_state_dict(saved_weights)
    opt2 = build_optimizer(clone, OptimSection(), torch.device("cpu"))
    OptimizerState(opt2).load_state_dict(saved_opt)
    x = torch.randint(0, CONFIG.vocab_size, (2, 8))
    for m, o in ((model, opt), (clone, opt2)):
        m(x, x)[1].backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), name


def test_optimizer_state_of_another_model_is_refused():
    _, opt = trained_pair()
    other = build_optimizer(GPT(CONFIG.replace(n_layer=1)), OptimSection(), torch.device("cpu"))
    with pytest.raises(GPT2LabError, match="^optimizer state names other parameters than this model's"):
        OptimizerState(other).load_state_dict(OptimizerState(opt).state_dict())


def test_counters_are_json_and_read_older_states():
    c = Counters(step=12, tokens=12 * 128, skipped_steps=2)
    state = json.loads(json.dumps(c.state_dict()))
    assert state == {"step": 12, "tokens": 1536, "skipped_steps": 2, "best_val_loss": None}  # no val loss yet
    back = Counters()
    back.load_state_dict(state)
    assert back == c and back.best_val_loss == math.inf
    back.load_state_dict({"step": 4, "tokens": 512, "best_val_loss": 3.25})  # written before skipped_steps
    assert back == Counters(step=4, tokens=512, skipped_steps=0, best_val_loss=3.25)


def test_schedule_sets_each_steps_rate_and_resumes_where_it_was():
    _, opt = trained_pair()
    optim = OptimSection(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    schedule = Schedule(opt, optim, max_steps=10)
    rates = []
    for _ in range(4):
        rates.append(schedule.apply())
        schedule.advance()
    assert rates == [lr_at(s, optim, 10) for s in range(4)] and rates[:2] == [5e-4, 1e-3]
    assert schedule.state_dict() == {"step": 4}
    resumed = Schedule(opt, optim, max_steps=10)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.apply() == lr_at(4, optim, 10) == pytest.approx(8.682e-4, rel=1e-4)
    assert all(g["lr"] == resumed.lr(4) for g in opt.param_groups)
    with pytest.raises(GPT2LabError, match="step must be an integer >= 0, got -1"):
        resumed.load_state_dict({"step": -1})


def test_rng_state_repeats_every_generators_draws():
    rng = RNGState()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(rng.state_dict()))
    first = (torch.rand(3).tolist(), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # the generators move on
    rng.load_state_dict(state)
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == first
