"""Weights & Biases logging (train.wandb_project, train/wandb_log.py), offline: the run's .wandb files
hold the records of metrics.jsonl, a resumed run logs into the same wandb run, and without the package
the error says how to install it."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO
from train_utils import tiny_config, train_losses

from gpt2lab.errors import GPT2LabError
from gpt2lab.train import train
from gpt2lab.train.wandb_log import stored_run_id

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = REPO / "configs"

# A .wandb file is a 7-byte header (":W&B", a magic number, a version), then LevelDB's log format:
# 32 KiB blocks of chunks, each a CRC32 (4 bytes), a little-endian length (2) and a type (1: a whole
# record, 2 / 3 / 4: its first, middle and last part); a block's tail too short for a chunk header is padding.
HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7


def wandb_records(path: Path) -> list:
    """Every protobuf Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a preallocated block
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(path: Path) -> list[dict]:
    """The rows a run logged (wandb.log calls), each {key: value}; a logged object (a table) is a dict."""
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in r.history.item:
            *parents, last = [item.key] if item.key else list(item.nested_key)
            place = row
            for parent in parents:
                place = place.setdefault(parent, {})
            place[last] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_config(path: Path) -> dict:
    """The run's config as the run record and any config updates set it, {key: value}."""
    config = {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
    return config


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Iterator[Path]:
    """wandb in offline mode with every file it writes under tmp_path; returns WANDB_DIR."""
    wandb = pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # pytest captures the output; wandb need not
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    yield tmp_path / "wandb"
    wandb.teardown()  # no service process left behind


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The .wandb files of the offline runs under WANDB_DIR, oldest first, written out: wandb's service
    process writes them behind the runs, and shutting it down (as the interpreter's exit does) waits
    for that; a later run starts a new service."""
    import wandb

    wandb.teardown()
    return sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def test_offline_run_holds_the_records_and_resume_continues_it(corpus, tmp_path, wandb_offline):
    run = tmp_path / "run"
    sections = {
        "train": {"wandb_project": "gpt2lab-tests"},
        "eval": {"every": 4, "sample_tokens": 4, "sample_prompt": "ROMEO:"},
    }
    train(tiny_config(corpus, run, **sections), stop_at=4, progress=False)
    run_id = stored_run_id(run)
    assert run_id and len(offline_runs(wandb_offline)) == 1
    assert train(tiny_config(corpus, run, **sections), resume="auto", progress=False).step == 8

    files = offline_runs(wandb_offline)
    assert len(files) == 2 and stored_run_id(run) == run_id
    assert all(f.name == f"run-{run_id}.wandb" for f in files)  # the same wandb run, resumed
    rows = [row for f in files for row in history(f)]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    train_records = [r for r in records if r["kind"] == "train"]
    logged = {row["step"]: row for row in rows if "train/loss" in row}
    assert sorted(logged) == [r["step"] for r in train_records] == list(range(1, 9))
    for r in train_records:  # the very numbers metrics.jsonl holds
        row = logged[r["step"]]
        for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_sec"):
            assert row[f"train/{key}"] == r[key], (r["step"], key)
    evals = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [4, 8]
    assert {row["step"]: row["eval/val_loss"] for row in rows if "eval/val_loss" in row} == evals

    samples = [row for row in rows if "samples/text" in row]
    assert [row["step"] for row in samples] == [4, 8]
    table_file = files[1].parent / "files" / samples[-1]["samples/text"]["path"]
    table = json.loads(table_file.read_text())
    texts = [r["text"] for r in records if r["kind"] == "sample"]
    assert table["columns"] == ["step", "prompt", "text"]
    assert table["data"] == [[4, "ROMEO:", texts[0]], [8, "ROMEO:", texts[1]]]  # the first from metrics.jsonl

    config = run_config(files[0])
    assert config["train"]["wandb_project"] == "gpt2lab-tests"
    assert config["run"]["world_size"] == 1

    # Logging changes nothing the run computes: its resumed losses are those of a plain run, exactly.
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, eval=sections["eval"]), progress=False)
    assert train_losses(straight) == train_losses(run)


def test_a_run_that_starts_afresh_gets_a_new_wandb_run(corpus, tmp_path, wandb_offline):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb.json").write_text('{"id": "stale123"}')  # left by a run killed before its first checkpoint
    cfg = tiny_config(corpus, run, train={"max_steps": 2, "wandb_project": "gpt2lab-tests"})
    assert train(cfg, resume="auto", progress=False).step == 2  # no checkpoint: it starts from step 0
    assert stored_run_id(run) not in (None, "stale123")
    assert [f.parent.name.endswith(stored_run_id(run)) for f in offline_runs(wandb_offline)] == [True]


def test_without_wandb_the_error_says_how_to_install_it(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_config(corpus, tmp_path / "run", train={"max_steps": 2, "wandb_project": "p"})
    with pytest.raises(GPT2LabError) as raised:
        train(cfg, progress=False)
    message = str(raised.value)
    assert "\n" not in message and "pip install 'gpt2lab[wandb]'" in message


def test_a_run_wandb_refuses_is_one_line_saying_what_to_do(corpus, tmp_path, wandb_offline, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = tiny_config(corpus, tmp_path / "run", train={"max_steps": 2, "wandb_project": "my-runs"})
    with pytest.raises(GPT2LabError) as raised:
        train(cfg, progress=False)
    message = str(raised.value)
    assert "\n" not in message and "'my-runs'" in message and "No API key" in message and "WANDB_MODE" in message


def test_wandb_flag_and_project_name_check(cli):
    printed = cli("train", CONFIGS / "shakespeare-cpu.toml", "--wandb", "my-runs", "--print-config")
    assert printed.code == 0 and 'wandb_project = "my-runs"' in printed.out
    bad = cli("train", CONFIGS / "shakespeare-cpu.toml", "--wandb", "me/my-runs", "--print-config")
    assert bad.code != 0 and "train.wandb_project" in bad.err and "'me/my-runs'" in bad.err
