"""Reading models: a gpt2lab checkpoint or run directory loads through its own files, without the Hugging
Face bridge; a run directory reads as its newest complete checkpoint. (Training checkpoints:
test_train_checkpoint.py; Hugging Face sources: test_hf.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import subprocess_env

from gpt2lab.checkpoint import (
    META_FILE,
    checkpoint_dir,
    find_checkpoints,
    find_latest,
    load_model,
    looks_local,
    missing_model_path,
    resolve_checkpoint,
    save_model,
)
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50257)


def saved_model(folder, tok, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    save_model(model, folder, tok)
    return model


@pytest.mark.subprocess
def test_own_files_load_without_the_hugging_face_bridge(tmp_path, tok):
    model = saved_model(tmp_path / "ckpt", tok)
    idx = torch.randint(0, 50257, (1, 8))
    torch.save(idx, tmp_path / "idx.pt")
    torch.save(model.eval()(idx)[0], tmp_path / "logits.pt")
    code = f"""
import sys, torch
from gpt2lab.checkpoint import load_model_and_tokenizer
model, tok = load_model_and_tokenizer({str(tmp_path / "ckpt")!r})
idx = torch.load({str(tmp_path / "idx.pt")!r}, weights_only=True)
assert torch.equal(model(idx)[0], torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True))
print([m for m in ("gpt2lab.hf", "transformers") if m in sys.modules])
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_run_directory_reads_as_its_newest_complete_checkpoint(tmp_path, tok):
    run = tmp_path / "run"
    saved_model(checkpoint_dir(run, 2), tok, seed=1)
    newest = saved_model(checkpoint_dir(run, 10), tok, seed=2)  # step 10 sorts after step 2, not by name
    checkpoint_dir(run, 20).mkdir()  # begun, never completed: no gpt2lab.json
    (run / "checkpoints" / ".step_00000030.tmp-1").mkdir()
    assert [p.name for p in find_checkpoints(run)] == ["step_00000002", "step_00000010"]
    assert find_latest(run) == resolve_checkpoint(run) == checkpoint_dir(run, 10)
    assert resolve_checkpoint(checkpoint_dir(run, 2)) == checkpoint_dir(run, 2)
    assert resolve_checkpoint(tmp_path) is None
    idx = torch.randint(0, 50257, (1, 8))
    assert torch.equal(load_model(run)(idx)[0], newest.eval()(idx)[0])
    meta = json.loads((checkpoint_dir(run, 10) / META_FILE).read_text())
    assert meta["format"] == "gpt2lab" and meta["model"]["n_embd"] == 8


# ---------------------------------------------------------------------------- a path that names nothing (issue 23)


@pytest.fixture
def no_hub(monkeypatch):
    """The Hugging Face download, replaced by a failure: a local path must never reach it."""
    import gpt2lab.hf

    def refuse(name):
        raise AssertionError(f"the Hub was asked for {name!r}")

    monkeypatch.setattr(gpt2lab.hf, "download", refuse)


@pytest.mark.usefixtures("no_hub")
def test_a_mistyped_run_directory_is_a_local_path_error_with_the_close_name(tmp_path, tok, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    saved_model(checkpoint_dir(tmp_path / "runs" / "demo", 1), tok)
    result = cli("sample", "--model", "runs/demoo", "--max-new-tokens", "2", "--device", "cpu")
    assert result.code == 1 and result.out == ""
    assert result.err == (
        "gpt2lab sample: error: no model at runs/demoo (no such file or directory); did you mean runs/demo?\n"
    )
    with pytest.raises(GPT2LabError, match=r"^no model at runs/nope \(no such file or directory\); check the path"):
        load_model("runs/nope")
    deeper = "runs/demo/checkpoints/step_00000009"
    with pytest.raises(GPT2LabError, match=rf"no model at {deeper} .*did you mean runs/demo/checkpoints/step_00000001"):
        load_model(deeper)


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize(
    "name",
    [
        "./model",
        "../elsewhere/model",
        "/no/such/model",
        "~/no-such-model",
        "a/b/c",
        "weights.safetensors",
        "step_00000100",
    ],
)
def test_names_that_look_local_never_reach_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert looks_local(name)
    with pytest.raises(GPT2LabError, match="^no model at "):
        load_model(name)


def test_a_user_slash_repo_name_still_goes_to_the_hub(tmp_path, monkeypatch):
    import gpt2lab.hf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # beside a local runs/, another first component is still a Hub user
    asked = []

    def download(name):
        asked.append(name)
        raise GPT2LabError("offline")

    monkeypatch.setattr(gpt2lab.hf, "download", download)
    assert not looks_local("someuser/somemodel") and missing_model_path("someuser/somemodel") is None
    with pytest.raises(GPT2LabError, match="offline"):
        load_model("someuser/somemodel")
    assert asked == ["someuser/somemodel"]
