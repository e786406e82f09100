"""Checkpoint directories: pruning old ones (which deletes user data), and the training checkpoint's
dict of components laid out as trainer.json has always had it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.fileio import atomic_write_json
from gpt2lab.model import GPT


def fake_checkpoint(run: Path, step: int, val_loss: float | None = None) -> Path:
    """A complete checkpoint as far as pruning can tell: a step_* directory with a gpt2lab.json."""
    folder = ckpt.checkpoint_dir(run, step)
    folder.mkdir(parents=True)
    (folder / ckpt.WEIGHTS_FILE).write_bytes(b"weights")
    atomic_write_json(folder / ckpt.META_FILE, {"format": "gpt2lab", "training": {"step": step, "val_loss": val_loss}})
    return folder


def steps_left(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in ckpt.find_checkpoints(run)]


def test_prune_keeps_the_last_n(tmp_path):
    for step in (100, 200, 300, 400, 500):
        fake_checkpoint(tmp_path, step)
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_best=True)  # no val loss anywhere: no best
    assert [p.name for p in removed] == ["step_00000100", "step_00000200", "step_00000300"]
    assert steps_left(tmp_path) == [400, 500]
    # Deleted for good: no hidden `.step_*.del-*` directory is left behind.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000400", "step_00000500"]
    assert ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_best=True) == []  # nothing more to do


@pytest.mark.parametrize("keep_best, left", [(True, [200, 400, 500]), (False, [400, 500])])
def test_prune_keeps_the_best_val_loss_when_asked(tmp_path, keep_best, left):
    for step, val in ((100, 3.1), (200, 2.5), (300, None), (400, 2.9), (500, 2.7)):
        fake_checkpoint(tmp_path, step, val)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_best=keep_best)
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
    ckpt.prune_checkpoints(tmp_path, keep_last=1, keep_best=True)
    assert steps_left(tmp_path) == left


def test_prune_refuses_to_keep_nothing(tmp_path):
    fake_checkpoint(tmp_path, 100)
    with pytest.raises(ValueError, match="keep_last must be at least 1 .*got 0"):
        ckpt.prune_checkpoints(tmp_path, keep_last=0, keep_best=False)
    assert steps_left(tmp_path) == [100]


def test_prune_survives_half_written_and_damaged_directories(tmp_path):
    for step in (100, 200, 300):
        fake_checkpoint(tmp_path, step, 3.0 - step / 1000)
    root = tmp_path / "checkpoints"
    # A kill -9 mid-write leaves a hidden temporary; one mid-delete, a hidden .del directory; a
    # step_* directory without gpt2lab.json is not (yet) a checkpoint; a damaged gpt2lab.json has no val loss.
    (root / ".step_00000400.tmp-77").mkdir()
    (root / ".step_00000400.tmp-77" / ckpt.OPTIMIZER_FILE).write_bytes(b"half")
    (root / ".step_00000050.del-66").mkdir()
    (root / "step_00000500").mkdir()
    (root / "step_00000500" / ckpt.WEIGHTS_FILE).write_bytes(b"partial")
    (ckpt.checkpoint_dir(tmp_path, 100) / ckpt.META_FILE).write_text("{not json")

    removed = ckpt.prune_checkpoints(tmp_path, keep_last=1, keep_best=True)
    assert [p.name for p in removed] == ["step_00000100", "step_00000200"]  # 300 is the newest and the best
    assert steps_left(tmp_path) == [300]
    assert sorted(p.name for p in root.iterdir()) == [
        ".step_00000050.del-66",
        ".step_00000400.tmp-77",
        "step_00000300",
        "step_00000500",
    ]  # what is not a complete checkpoint is neither counted nor touched
    assert (root / "step_00000500" / ckpt.WEIGHTS_FILE).read_bytes() == b"partial"

    ckpt.remove_stale_temporaries(tmp_path)  # the next run's start clears the hidden leftovers only
    assert sorted(p.name for p in root.iterdir()) == ["step_00000300", "step_00000500"]


def tiny_states(step: int, scaler: dict) -> tuple[GPT, dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50257))
    weights = ckpt.model_weights(model)
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
    folder = ckpt.save_training_checkpoint(tmp_path, 7, states, model.config, tok, {"step": 7})
    assert folder == ckpt.checkpoint_dir(tmp_path, 7) and ckpt.is_training_checkpoint(folder)
    on_disk = json.loads((folder / ckpt.TRAINER_FILE).read_text())
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
    meta, loaded = ckpt.load_training_checkpoint(folder)
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
    folder = ckpt.save_training_checkpoint(tmp_path, 3, states, model.config, tok, {})
    trainer = json.loads((folder / ckpt.TRAINER_FILE).read_text())
    assert "grad_scaler" not in trainer  # a disabled loss scaler saves nothing
    # trainer.json as gpt2lab wrote it before the schedule was a component of its own.
    del trainer["schedule"]
    (folder / ckpt.TRAINER_FILE).write_text(json.dumps(trainer))
    _, loaded = ckpt.load_training_checkpoint(folder)
    assert loaded["schedule"] == {"step": 3} and "grad_scaler" not in loaded


def test_a_damaged_trainer_json_is_one_clear_error(tmp_path, tok):
    model, states = tiny_states(3, scaler={})
    folder = ckpt.save_training_checkpoint(tmp_path, 3, states, model.config, tok, {})
    (folder / ckpt.TRAINER_FILE).write_text(json.dumps({"step": 3, "tokens": 384}))
    with pytest.raises(GPT2LabError, match=r"trainer.json has no 'ranks': it is damaged"):
        ckpt.load_training_checkpoint(folder)
