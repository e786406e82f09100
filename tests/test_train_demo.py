"""`make demo`'s pipeline (python -m gpt2lab.demo) on a trimmed budget: corpus choice, prepare, train,
samples, plot, and the closing directions."""

from __future__ import annotations

import urllib.request

import pytest
from train_utils import one_thread  # noqa: F401 (autouse fixture)

from gpt2lab import demo
from gpt2lab.data import read_manifest

TRIM = [
    "--steps",
    "2",
    "--no-progress",
    *("--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32"),
    *("--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.total_batch_tokens=64"),
    *("--set", "eval.val_tokens=512", "--set", "checkpoint.every=0"),
]


def test_demo_trains_on_the_bundled_tiny_shakespeare_offline(tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("the demo must not use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    out = tmp_path / "runs" / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    text = capsys.readouterr().out
    assert "corpus: Tiny Shakespeare" in text
    assert "ROMEO:" in text and "JULIET:" in text  # the samples
    assert "done in" in text and "val loss" in text and "data preparation + training" in text
    assert "gpt2lab sample --model" in text and "finetune-gpt2-shakespeare.toml" in text
    assert "gpt2-124M-fineweb-edu.toml" in text
    assert (out / "loss.png").is_file() and (out / "config.toml").is_file()
    manifest = read_manifest(tmp_path / "data" / "tinyshakespeare")
    assert manifest["source"]["preset"] == "tinyshakespeare" and manifest["total_tokens"] == 338_026
    # Running it again replaces the previous demo run instead of refusing it.
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    assert "replacing the previous demo run" in capsys.readouterr().out


def test_demo_on_the_python_docs_when_asked(tmp_path, capsys):
    from pydoc_data.topics import topics

    out = tmp_path / "demo"
    assert demo.main(["--corpus", "pydoc", "--out", str(out), "--data-root", str(tmp_path / "data"), *TRIM]) == 0
    text = capsys.readouterr().out
    assert "corpus: the Python documentation" in text
    assert "The with statement" in text  # the pydoc prompts
    manifest = read_manifest(tmp_path / "data" / "pydoc-topics")
    assert manifest["documents"] == len(topics)


def test_demo_refuses_an_unknown_corpus(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--corpus", "auto"])
    assert e.value.code == 2 and "invalid choice: 'auto'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help"])
def test_demo_help(flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main([flag])
    assert e.value.code == 0 and "make demo" in capsys.readouterr().out
