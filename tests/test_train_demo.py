"""`make demo`'s pipeline (python -m gpt2lab.demo) on a trimmed budget: corpus choice, prepare, train,
samples, plot, and the closing directions."""

from __future__ import annotations

import shutil

import pytest
from train_utils import one_thread  # noqa: F401 (autouse fixture)

from gpt2lab import demo
from gpt2lab.errors import GPT2LabError

TRIM = [
    "--steps",
    "2",
    "--no-progress",
    *("--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32"),
    *("--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.total_batch_tokens=64"),
    *("--set", "eval.val_tokens=512", "--set", "checkpoint.every=0"),
]


def test_demo_with_cached_tiny_shakespeare(tmp_path, offline_env, shakespeare_path, capsys):
    cache = offline_env / "gpt2lab"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(shakespeare_path, cache / "tinyshakespeare.txt")  # as a first download would leave it
    out = tmp_path / "runs" / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    text = capsys.readouterr().out
    assert "corpus: Tiny Shakespeare" in text
    assert "ROMEO:" in text and "JULIET:" in text  # the samples
    assert "done in" in text and "val loss" in text and "data preparation + training" in text
    assert "gpt2lab sample --model" in text and "finetune-gpt2-shakespeare.toml" in text
    assert "gpt2-124M-fineweb-edu.toml" in text
    assert (out / "loss.png").is_file() and (out / "config.toml").is_file()
    assert (tmp_path / "data" / "tinyshakespeare" / "manifest.json").is_file()
    # Running it again replaces the previous demo run instead of refusing it.
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    assert "replacing the previous demo run" in capsys.readouterr().out


def test_demo_offline_falls_back_to_the_python_docs(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise GPT2LabError("could not download (no network)")

    monkeypatch.setattr("gpt2lab.download.cached_download", offline)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    text = capsys.readouterr().out
    assert "Tiny Shakespeare is not cached and cannot be downloaded" in text
    assert "corpus: the Python documentation" in text
    assert (tmp_path / "data" / "pydoc-topics" / "manifest.json").is_file()


def test_demo_refuses_unavailable_shakespeare_when_asked_for_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise GPT2LabError("no network")

    monkeypatch.setattr("gpt2lab.download.cached_download", offline)
    code = demo.main(["--corpus", "tinyshakespeare", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 1


@pytest.mark.parametrize("flag", ["--help"])
def test_demo_help(flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main([flag])
    assert e.value.code == 0 and "make demo" in capsys.readouterr().out
