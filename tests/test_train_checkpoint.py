"""Training checkpoints: the components' state_dict() / load_state_dict() pairs restore exactly,
the dict of their states is laid out as trainer.json has always had it, and pruning old checkpoints
(which deletes user data) keeps what it must."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.checkpoint import META_FILE, WEIGHTS_FILE, checkpoint_dir, find_checkpoints, model_weights
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.fileio import atomic_write_json
from gpt2lab.model import GPT
from gpt2lab.train.build import empty_model
from gpt2lab.train.checkpoint import (
    OPTIMIZER_FILE,
    TRAINER_FILE,
    is_training_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_training_checkpoint,
)
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


def fake_checkpoint(run: Path, step: int, val_loss: float | None = None) -> Path:
    """A complete checkpoint as far as pruning can tell: a step_* directory with a gpt2lab.json."""
    folder = checkpoint_dir(run, step)
    folder.mkdir(parents=True)
    (folder / WEIGHTS_FILE).write_bytes(b"weights")
    atomic_write_json(folder / META_FILE, {"format": "gpt2lab", "training": {"step": step, "val_loss": val_loss}})
    return folder


def steps_left(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in find_checkpoints(run)]


def test_prune_keeps_the_last_n(tmp_path):
    for step in (100, 200, 300, 400, 500):
        fake_checkpoint(tmp_path, step)
    removed = prune_checkpoints(tmp_path, keep_last=2, keep_best=True)  # no val loss anywhere: no best
    assert [p.name for p in removed] == ["step_00000100", "step_00000200", "step_00000300"]
    assert steps_left(tmp_path) == [400, 500]
    # Deleted for good: no hidden `.step_*.del-*` directory is left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000400", "step_00000500"]
    assert prune_checkpoints(tmp_path, keep_last=2, keep_best=True) == []  # nothing more to do


@pytest.mark.parametrize("keep_best, left", [(True, [200, 400, 500]), (False, [400, 500])])
def test_prune_keeps_the_best_val_loss_when_asked(tmp_path, keep_best, left):
    for step, val in ((100, 3.1), (200, 2.5), (300, None), (400, 2.9), (500, 2.7)):
        fake_checkpoint(tmp_path, step, val)
    prune_checkpoints(tmp_path, keep_last=2, keep_best=keep_best)
    assert steps_left(tmp_path) == left


@pytest.mark.parametrize(
    "vals, left",
    [
        ((3.0, 2.9, 2.8, 2.7), [400]),  # the newest is the best: one checkpoint, kept once
        ((2.0, 2.9, 2.8, 2.7), [100, 400]),  # the oldest is the best: it stays beside the newest
        ((2.5, 2.5, 2.9, 3.0), [100, 400]),  # a tie: the first of the best stays
    ],
)
def test_prune_never_deletes_the_newest_or_the_best(tmp_path, vals, left):
    for step, val in zip((100, 200, 300, 400), vals):
        fake_checkpoint(tmp_path, step, val)
    prune_checkpoints(tmp_path, keep_last=1, keep_best=True)
    assert steps_left(tmp_path) == left


def test_prune_refuses_to_keep_nothing(tmp_path):
    fake_checkpoint(tmp_path, 100)
    with pytest.raises(ValueError, match="keep_last must be at least 1 .*got 0"):
        prune_checkpoints(tmp_path, keep_last=0, keep_best=False)
    assert steps_left(tmp_path) == [100]


def test_prune_survives_half_written_and_damaged_directories(tmp_path):
    for step in (100, 200, 300):
        fake_checkpoint(tmp_path, step, 3.0 - step / 1000)
    root = tmp_path / "checkpoints"
    # A kill -9 mid-write leaves a hidden temporary; one mid-delete, a hidden .del directory; a
    # step_* directory without gpt2lab.json is not (yet) a checkpoint; a damaged gpt2lab.json has no val loss.
    (root / ".step_00000400.tmp-77").mkdir()
    (root / ".step_00000400.tmp-77" / OPTIMIZER_FILE).write_bytes(b"half")
    (root / ".step_00000050.del-66").mkdir()
    (root / "step_00000500").mkdir()
    (root / "step_00000500" / WEIGHTS_FILE).write_bytes(b"partial")
    (checkpoint_dir(tmp_path, 100) / META_FILE).write_text("{not json")

    removed = prune_checkpoints(tmp_path, keep_last=1, keep_best=True)
    assert [p.name for p in removed] == ["step_00000100", "step_00000200"]  # 300 is the newest and the best
    assert steps_left(tmp_path) == [300]
    assert sorted(p.name for p in root.iterdir()) == [
        ".step_00000050.del-66",
        ".step_00000400.tmp-77",
        "step_00000300",
        "step_00000500",
    ]  # what is not a complete checkpoint is neither counted nor touched
    assert (root / "step_00000500" / WEIGHTS_FILE).read_bytes() == b"partial"

    remove_stale_temporaries(tmp_path)  # the next run's start clears the hidden leftovers only
    assert sorted(p.name for p in root.iterdir()) == ["step_00000300", "step_00000500"]


def tiny_states(step: int, scaler: dict) -> tuple[GPT, dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50257))
    weights = model_weights(model)
    adam = {f"{name}.exp_avg": torch.full_like(w, 0.5) for name, w in weights.items()}
    states = {
        "model": weights,
        "optimizer": {"tensors": adam, "param_groups": [{"names": sorted(weights), "weight_decay": 0.1}]},
        "grad_scaler": scaler,
        "schedule": {"step": step},
        "counters": {"step": step, "tokens": step * 128, "skipped_steps": 1, "best_val_loss": None},
        "ranks": [{"rng": {"torch": "r0"}, "loader": {"epoch": 0, "cursor": 8}}, {"rng": {"torch": "r1"}}],
    }
    return model, states


def test_training_checkpoint_round_trip_and_its_trainer_json(tmp_path, tok):
    model, states = tiny_states(7, scaler={"scale": 1024.0, "_growth_tracker": 3})
    folder = save_training_checkpoint(tmp_path, 7, states, model.config, tok, {"step": 7})
    assert folder == checkpoint_dir(tmp_path, 7) and is_training_checkpoint(folder)
    on_disk = json.loads((folder / TRAINER_FILE).read_text())
    assert on_disk == {  # the layout docs/formats.md describes
        "step": 7,
        "tokens": 896,
        "skipped_steps": 1,
        "best_val_loss": None,
        "world_size": 2,
        "optimizer": {"param_groups": states["optimizer"]["param_groups"]},
        "ranks": states["ranks"],
        "grad_scaler": {"scale": 1024.0, "_growth_tracker": 3},
        "schedule": {"step": 7},
    }
    meta, loaded = load_training_checkpoint(folder)
    assert meta["training"] == {"step": 7} and meta["model"]["n_embd"] == 8
    assert loaded.keys() == states.keys()
    for name in ("grad_scaler", "schedule", "counters", "ranks"):
        assert loaded[name] == states[name], name
    assert loaded["optimizer"]["param_groups"] == states["optimizer"]["param_groups"]
    for saved, back in (
        (states["model"], loaded["model"]),
        (states["optimizer"]["tensors"], loaded["optimizer"]["tensors"]),
    ):
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)


def test_an_empty_component_is_left_out_and_older_checkpoints_get_their_schedule(tmp_path, tok):
    model, states = tiny_states(3, scaler={})
    folder = save_training_checkpoint(tmp_path, 3, states, model.config, tok, {})
    trainer = json.loads((folder / TRAINER_FILE).read_text())
    assert "grad_scaler" not in trainer  # a disabled loss scaler saves nothing
    # trainer.json as gpt2lab wrote it before the schedule was a component of its own.
    del trainer["schedule"]
    (folder / TRAINER_FILE).write_text(json.dumps(trainer))
    _, loaded = load_training_checkpoint(folder)
    assert loaded["schedule"] == {"step": 3} and "grad_scaler" not in loaded


def test_a_damaged_trainer_json_is_one_clear_error(tmp_path, tok):
    model, states = tiny_states(3, scaler={})
    folder = save_training_checkpoint(tmp_path, 3, states, model.config, tok, {})
    (folder / TRAINER_FILE).write_text(json.dumps({"step": 3, "tokens": 384}))
    with pytest.raises(GPT2LabError, match=r"trainer.json has no 'ranks': it is damaged"):
        load_training_checkpoint(folder)
