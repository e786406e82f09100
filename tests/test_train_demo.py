"""`make demo`'s pipeline (python -m gpt2lab.demo) on a trimmed budget: corpus choice, prepare, train,
samples, plot, and the closing directions."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from helpers import subprocess_env

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


def _cfg():
    return load_train_config(demo.find_config(), [])


def test_a_short_budget_trains_a_short_run_fitted_to_it():
    cfg = _cfg()  # 1200 steps of 1024 tokens, warm-up 100, lr 6e-3 -> 6e-4 (AdamW), Muon 0.01
    first = demo.fit_to_budget(cfg, step_time=0.5, budget=300.0, spent=30.0)  # 1200 x 0.465 s > 245 s left
    assert first.short
    short = load_train_config(demo.find_config(), list(demo.SHORT_RUN))
    # 300 s, 20 s spent (start-up, preparation and the timing), 25 s in reserve: 255 s at 0.25 s a step
    # is 1020 steps
    assert demo.RESERVE_SECONDS == 25.0
    plan = demo.fit_to_budget(cfg, step_time=0.25, budget=300.0, spent=20.0, short=short)
    assert plan.short and plan.steps == 1020 and plan.tokens_per_step == 512
    assert plan.warmup_steps == round(100 * 1020 / 1200) == 85
    assert plan.overrides() == [
        "train.batch_size=4",
        "train.total_batch_tokens=512",
        "train.max_steps=1020",
        "optim.warmup_steps=85",
        "eval.every=510",
        "checkpoint.every=510",
    ]
    text = plan.explain(cfg)
    assert "the config's 1200 steps do not fit in the 4.2 min left after 25 s kept" in text
    assert (
        "1020 steps (4.2 min) of 512 tokens, warm-up 85 steps, learning rate 0.006 decaying to 0.0006 "
        "(AdamW; the blocks' matrices: Muon at 0.01, scaled alike) at step 1020"
    ) in text
    assert "250 ms per step of 512 tokens on this CPU" in text and "bf16 instructions" in text
    # A short run never has more tokens than the config's run.
    assert demo.fit_to_budget(cfg, step_time=0.01, budget=300.0, spent=40.0, short=short).steps == 2400


def test_a_fast_machine_keeps_the_configs_run():
    cfg = _cfg()
    plan = demo.fit_to_budget(cfg, step_time=0.18, budget=300.0, spent=10.0)  # 1200 x 0.18 s < 265 s
    assert not plan.short and plan.steps == 1200 and plan.warmup_steps == 100
    expected = ["train.max_steps=1200", "optim.warmup_steps=100", "eval.every=600", "checkpoint.every=600"]
    assert plan.overrides() == expected
    assert "the config's 1200 steps (3.6 min) fit" in plan.explain(cfg)


def test_too_small_a_budget_still_trains_the_minimum_and_says_so(capsys):
    cfg = _cfg()
    short = load_train_config(demo.find_config(), list(demo.SHORT_RUN))
    plan = demo.fit_to_budget(cfg, step_time=1.0, budget=90.0, spent=30.0, short=short)  # 35 s: 35 steps
    assert plan.steps == demo.MIN_STEPS
    assert "only 35 steps fit in 1.5 min on this machine; planning 50, which the time limit will cut short" in (
        capsys.readouterr().out
    )


def test_the_demo_times_its_steps_and_prints_its_plan(tmp_path, capsys):
    trim = [a for a in TRIM if a not in ("--steps", "2")] + ["--set", "train.max_steps=12"]
    out = tmp_path / "runs" / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), "--minutes", "3", *trim]) == 0
    text = capsys.readouterr().out
    assert "budget: 3 min in all;" in text and "ms per step of 64 tokens on this CPU" in text
    assert "plan: the config's 12 steps" in text
    assert "12 steps, val loss" in text and "of a 3-minute budget" in text
    assert "s start-up, data and planning," in text and "s samples and plot" in text
    # Training had a time limit: what was left of the 3 minutes after planning, less the tail's reserve.
    limit = load_train_config(out / "config.toml", []).train.max_minutes
    assert 0 < limit < 3 - demo.TAIL_SECONDS / 60
    assert not list(out.parent.glob(".demo-timing-*"))  # the timing run leaves nothing behind


def test_a_budget_too_short_for_the_config_trains_a_short_run(tmp_path, capsys):
    # 400 steps of 64 tokens do not fit in 3 seconds: a short run of 512-token steps, the same tokens at most
    trim = [a for a in TRIM if a not in ("--steps", "2")] + ["--set", "train.max_steps=400"]
    out = tmp_path / "runs" / "demo"
    assert demo.main(["--out", str(out), "--data-root", str(tmp_path / "data"), "--minutes", "0.05", *trim]) == 0
    text = capsys.readouterr().out
    assert "plan: the config's 400 steps do not fit" in text and "a short run instead: 50 steps" in text
    assert "note: only 0 steps fit in 0.05 min on this machine; planning 50" in text
    cfg = load_train_config(out / "config.toml", [])
    assert (cfg.train.batch_size, cfg.train.total_batch_tokens, cfg.train.max_steps) == (4, 512, 50)


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


def test_the_budget_counts_from_the_start_it_is_given(tmp_path, capsys):
    # As `python -m gpt2lab.demo` passes its process's start: 170 s of a 3-minute budget already gone.
    import time

    trim = [a for a in TRIM if a not in ("--steps", "2")] + ["--set", "train.max_steps=400"]
    argv = ["--out", str(tmp_path / "demo"), "--data-root", str(tmp_path / "data"), "--minutes", "3", *trim]
    assert demo.main(argv, started=time.perf_counter() - 170) == 0
    text = capsys.readouterr().out
    assert "budget: 3 min in all; 17" in text  # 170-odd seconds spent, the timing included
    assert "note: only 0 steps fit in 3 min on this machine; planning 50" in text
    assert "do not fit in the 0.0 min left" in text  # never a negative time


def test_a_short_run_of_fewer_steps_than_the_warm_up_warms_up_over_all_of_them():
    cfg = load_train_config(demo.find_config(), ["train.max_steps=12"])  # warm-up 100 of 12 steps
    short = load_train_config(demo.find_config(), ["train.max_steps=12", *demo.SHORT_RUN])
    plan = demo.fit_to_budget(cfg, step_time=0.1, budget=300.0, spent=10.0, short=short)
    assert plan.steps == 24 and plan.warmup_steps == 24


def test_process_age_counts_from_the_start_of_this_process(monkeypatch):
    if sys.platform.startswith("linux"):
        # A process that slept half a second before asking is at least that old.
        code = "import time; time.sleep(0.5); from gpt2lab.demo import process_age; print(process_age())"
        env = subprocess_env()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert 0.5 <= float(out.stdout) < 60
    monkeypatch.setattr(demo.Path, "read_text", lambda self: "not a stat line")
    assert demo.process_age() == 0.0  # where /proc is missing or unreadable, the budget starts at main()
