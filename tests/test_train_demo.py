"""`make demo`'s pipeline (python -m gpt2lab.demo) on a trimmed budget: corpus choice, prepare, train,
samples, plot, and the closing directions."""

from __future__ import annotations

import urllib.request

import pytest

from gpt2lab import demo
from gpt2lab.data import read_manifest
from gpt2lab.train.config import load_train_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.subprocess]  # prepare starts workers

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


def test_the_demo_trains_under_the_time_limit_its_budget_leaves(tmp_path, capsys):
    trim = [a for a in TRIM if a not in ("--steps", "2")] + ["--set", "train.max_steps=12"]
    out = tmp_path / "runs" / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), "--minutes", "3", *trim]) == 0
    text = capsys.readouterr().out
    assert "time limit: " in text and "3-minute budget less the data and 25 s" in text and "0.0006 by then" in text
    assert "12 steps, val loss" in text and "of a 3-minute budget" in text
    assert "s start-up and data," in text and "s samples and plot" in text
    # What was left of the 3 minutes after the data, less the reserve; the schedule paced by that limit;
    # the demo's warm-up for its 2,400 steps, and the --set options over the demo's own.
    cfg = load_train_config(out / "config.toml", [])
    assert 0 < cfg.train.max_minutes < 3 - demo.RESERVE_SECONDS / 60 and cfg.optim.fit_schedule_to_time
    assert (cfg.train.max_steps, cfg.optim.warmup_steps, cfg.eval.every, cfg.checkpoint.every) == (12, 200, 0, 0)
    assert (cfg.train.batch_size, cfg.train.total_batch_tokens) == (2, 64)


def test_the_demo_runs_its_own_steps_without_a_time_limit_when_given_steps(tmp_path):
    out = tmp_path / "demo"
    small = ("model.n_layer=1", "model.n_head=2", "model.n_embd=32", "eval.val_tokens=512")  # the demo's steps
    args = ["--steps", "2", "--no-progress", *(a for kv in small for a in ("--set", kv))]
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), *args]) == 0
    cfg = load_train_config(out / "config.toml", [])
    assert (cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.max_minutes) == (2, 1, 0)
    assert (cfg.train.batch_size, cfg.train.total_batch_tokens) == (4, 512) and not cfg.optim.fit_schedule_to_time


def test_a_budget_already_spent_still_trains_a_step_and_says_the_limit_ended_it(tmp_path, capsys):
    trim = [a for a in TRIM if a not in ("--steps", "2")] + ["--set", "train.max_steps=100000"]
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), "--minutes", "0.01", *trim]) == 0
    assert "steps (the time limit ended the run), val loss" in capsys.readouterr().out
    assert load_train_config(out / "config.toml", []).train.max_minutes == pytest.approx(1 / 60)  # never below 1 s


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--minutes", "0"], "--minutes must be positive, got 0"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_demo_refuses_a_bad_budget(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
