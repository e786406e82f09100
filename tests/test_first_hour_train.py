"""What `train` tells a new user (issue 23): the header before the first step and the step a resumed run
continues from, a sample prompt taken from the data the run trains on, and a mistyped
train.init_from reported as a local path without asking the Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from train_utils import tiny_config

from gpt2lab.checkpoint import load_model
from gpt2lab.errors import GPT2LabError
from gpt2lab.train import train
from gpt2lab.train.config import to_toml
from gpt2lab.train.evaluate import data_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_header_and_the_resume_line_say_what_the_run_does(corpus, tmp_path, cli):
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(tiny_config(corpus, run)))
    first = cli("train", config, "--stop-at", "5", "--no-progress")
    assert first.code == 0, first.err
    header = first.out.splitlines()[:6]
    params = int(
        re.fullmatch(
            r"model: 2 layers, 2 heads, 32 wide, context 16: ([\d,]+) parameters \(initialised afresh\)", header[0]
        )
        .group(1)
        .replace(",", "")
    )
    assert params == load_model(run).num_params()
    assert header[1].startswith("device: cpu, 1 thread, float32")
    assert re.fullmatch(
        rf"data: [\d,]+ train and 2,048 val tokens in {re.escape(str(corpus))}, tokenizer gpt2 "
        r"\(50,257 tokens\)",
        header[2],
    )
    # 128 tokens a step from micro-batches of 4 x 16 = 64: two micro-steps.
    assert header[3].startswith("steps: 8 x 128 tokens = 1,024 tokens (")
    assert header[3].endswith("micro-batches of 4 x 16, gradient accumulation 2")
    assert header[4] == "eval: at the end: val loss on up to 256 val tokens"
    assert header[5] == f"run directory: {run}"
    assert "resuming" not in first.out

    second = cli("train", config, "--resume", "auto", "--no-progress")
    assert second.code == 0, second.err
    checkpoint = run / "checkpoints" / "step_00000005"
    resume = f"resuming from step 5 of 8 (checkpoint {checkpoint})"
    assert second.out.splitlines()[:7] == [
        header[0].replace("initialised afresh", "from the checkpoint"),
        *header[1:],
        resume,
    ]
    events = [(r["step"], r["message"]) for r in records(run, "event")]
    assert (0, header[3]) in events and (5, header[3]) in events and (5, resume) in events


def test_a_sample_prompt_of_auto_is_the_first_words_of_the_val_split(tmp_path, tok):
    eot = tok.eot_token
    assert data_prompt([eot, *tok.encode("First Citizen:\nBefore we proceed any further")], tok) == "First Citizen:"
    long = "\n\n  The lighthouse keeper counted every ship that passed the rocks\nthen slept"
    assert data_prompt([eot, *tok.encode(long)], tok) == "The lighthouse keeper counted every ship that"
    assert data_prompt([eot, eot, *tok.encode("  \n"), eot, *tok.encode("Second doc")], tok) == "Second doc"
    assert data_prompt([eot], tok) == ""  # no text: a new document


def test_a_config_prompt_written_for_another_corpus_gives_way_to_the_data(tmp_path):
    from gpt2lab.data.prepare import PrepareOptions, prepare

    text = tmp_path / "logbook.txt"
    text.write_text("Harbour log, day one: calm seas and two fishing boats out.\n" * 400, encoding="utf-8")
    data = tmp_path / "data"
    prepare(PrepareOptions(source=str(text), out=data, val_tokens=512, workers=1, progress=False))
    sample = {"every": 0, "sample_tokens": 3}
    for name, prompt, expected in [
        ("auto", None, "Harbour log, day one:"),
        ("given", "KING", "KING"),
        ("new", "", ""),
    ]:
        evals = {**sample, "sample_prompt": prompt} if prompt is not None else sample
        train(tiny_config(data, tmp_path / name, train={"max_steps": 1}, eval=evals), progress=False)
        (record,) = records(tmp_path / name, "sample")
        assert record["prompt"] == expected
    # The Shakespeare configs ask for the data's own words.
    from gpt2lab.train.config import load_train_config

    for config in ("shakespeare-cpu.toml", "finetune-gpt2-shakespeare.toml"):
        assert load_train_config(Path(__file__).parents[1] / "configs" / config).eval.sample_prompt == "auto"


def test_a_mistyped_init_from_is_a_local_path_error(corpus, tmp_path, monkeypatch):
    import gpt2lab.hf

    def refuse(name):
        raise AssertionError(f"the Hub was asked for {name!r}")

    monkeypatch.setattr(gpt2lab.hf, "download", refuse)
    base = tmp_path / "runs" / "base"
    train(tiny_config(corpus, base, train={"max_steps": 1}), progress=False)
    cfg = tiny_config(corpus, tmp_path / "tuned", shape=False, train={"init_from": str(tmp_path / "runs" / "basee")})
    with pytest.raises(GPT2LabError) as e:
        train(cfg, progress=False)
    assert str(e.value) == (
        f"train.init_from: no model at {tmp_path}/runs/basee (no such file or directory); did you mean {base}?"
    )


def test_a_mistyped_resume_says_what_was_meant(corpus, tmp_path):
    from gpt2lab.distributed import DistEnv
    from gpt2lab.train.checkpoint import find_resume

    run = tmp_path / "runs" / "demo"
    train(tiny_config(corpus, run, train={"max_steps": 1}), progress=False)
    assert find_resume(tmp_path / "new", str(run), DistEnv()) == run / "checkpoints" / "step_00000001"
    cases = {
        str(tmp_path / "runs" / "demoo"): f"--resume {tmp_path}/runs/demoo: no such file or directory; "
        f"did you mean {run}?",
        "atuo": "--resume atuo: no such file or directory; did you mean --resume auto?",
        str(tmp_path / "elsewhere"): f"--resume {tmp_path}/elsewhere: no such file or directory; "
        "give auto, never or a run directory",
        str(tmp_path / "runs"): f"--resume {tmp_path}/runs: no training checkpoint there; give a run directory "
        "or a checkpoints/step_* directory, or use --init-from to start from weights only",
    }
    for resume, message in cases.items():
        with pytest.raises(GPT2LabError) as e:
            find_resume(tmp_path / "new", resume, DistEnv())
        assert str(e.value) == message
