"""`gpt2lab prepare` from a streamed Hugging Face dataset: a resume restores the stream's own state
(issue 11). The Hub stands in as local Parquet files loaded with `load_dataset(..., streaming=True)`,
several files so that the dataset has several source shards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import subprocess_env

from gpt2lab.data import outdir
from gpt2lab.data.prepare import PrepareOptions, prepare

pytest.importorskip("datasets")

SHARDS, ROWS, ROW_GROUP = 4, 24, 8  # source shards (Parquet files), rows in each, rows per row group
# What `datasets` reads again on a restore: from its last saved Arrow-batch boundary, which for a
# position in a shard's first row group is the end of the shard before (that whole shard is re-read
# to skip it). So: at most one source shard, plus the part of one row group before the position.
REREAD_BOUND = ROWS + ROW_GROUP - 1
OPTS = {"shard_tokens": 250, "piece_chars": 48, "val_tokens": 400}


def document(shard: int, row: int) -> str:
    """Short and long documents (a long one is cut into pieces, so tasks start mid-example), and
    every eleventh one empty."""
    if (shard * ROWS + row) % 11 == 5:
        return ""
    words = " ".join(f"w{shard}x{row}y{k}" for k in range(1 + (row * 7 + shard) % 23))
    return f"Document {shard}.{row}: {words}."


def make_dataset(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for s in range(SHARDS):
        texts = [document(s, r) for r in range(ROWS)]
        pq.write_table(pa.table({"text": texts}), root / "data" / f"train-{s:05d}-of-{SHARDS:05d}.parquet", ROW_GROUP)
    return root


def run(source: str, out: Path, notes: list[str] | None = None, **kw):
    return prepare(
        PrepareOptions(source, out, progress=False, workers=kw.pop("workers", 1), **OPTS, **kw),
        note=(notes.append if notes is not None else lambda line: None),
    )


def out_in(monkeypatch, where: Path) -> Path:
    """`out` under `where`, made the working directory: the manifest records the command, --out included,
    so runs compared byte for byte write to the same relative path."""
    where.mkdir()
    monkeypatch.chdir(where)
    return Path("out")


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def rows_read(monkeypatch):
    """Rows the Parquet reader of `datasets` hands out (the examples read from the source, the ones
    skipped on the way to a restored position included)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    count = [0]
    real = Parquet._generate_tables

    def counting(self, *args, **kwargs):
        for key, table in real(self, *args, **kwargs):
            count[0] += len(table)
            yield key, table

    monkeypatch.setattr(Parquet, "_generate_tables", counting)
    return count


# `prepare` in a child process, killed with SIGKILL by a hook: after the k-th update of the progress
# record that lists a chunk, or at the k-th write into a shard (mid-chunk, the record a chunk behind).
KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from gpt2lab.data import outdir, shards
    from gpt2lab.data.prepare import PrepareOptions, prepare
    kind, k, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    seen = [0]
    def tick():
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    if kind == "record":
        real_write = outdir.atomic_write_json
        def write(path, obj):
            real_write(path, obj)
            if os.path.basename(path) == outdir.PROGRESS_NAME and obj["chunks"]:
                tick()
        outdir.atomic_write_json = write
    else:
        real = shards.ShardWriter.write
        def shard_write(self, tokens):
            real(self, tokens)
            tick()
        shards.ShardWriter.write = shard_write
    prepare(PrepareOptions(**options))
    """
)


def killed_run(source: str, out: Path, kind: str, k: int) -> dict:
    options = {"source": source, "out": str(out), "workers": 2, "progress": False, **OPTS}
    r = subprocess.run(
        [sys.executable, "-c", KILLER, kind, str(k), json.dumps(options)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, f"prepare was not killed ({kind} {k}): {r.stderr}"
    assert not (out / "manifest.json").exists()
    return json.loads((out / outdir.PROGRESS_NAME).read_text())


@pytest.mark.subprocess
@pytest.mark.parametrize("kind, k", [("record", 1), ("record", 4), ("write", 9)])
def test_kill_9_then_resume_reads_at_most_one_source_shard_again(tmp_path, rows_read, monkeypatch, kind, k):
    source = f"hf:{make_dataset(tmp_path / 'ds')}"
    total = SHARDS * ROWS
    reference = run(source, out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    assert rows_read[0] == total
    expected = dir_bytes(tmp_path / "ref" / "out")
    assert len(reference.manifest["shards"]) >= 8 and reference.manifest["documents"] < total  # empties

    progress = killed_run(source, out, kind, k)
    chunks = progress["chunks"]
    assert len(chunks) >= 1 and all("resume_position" in c for c in chunks)
    position = chunks[-1]["resume_position"]
    done = position["examples"]  # examples before the resume point
    assert 0 < done < total

    rows_read[0] = 0
    notes: list[str] = []
    resumed = run(source, out, notes)
    assert notes == []  # the stream was restored: no note, no fallback
    assert resumed.resumed_chunks == len(chunks)
    assert dir_bytes(out) == expected
    # What was read again before the resume point: at most one source shard (and a row group).
    reread = rows_read[0] - (total - done)
    assert 0 <= reread <= REREAD_BOUND, (rows_read[0], done)


def test_resume_inside_a_long_example_and_twice(tmp_path, rows_read, monkeypatch):
    """Interrupted (in this process) after 2, then after 5 more chunks: each resume starts exactly where
    the record says, also from a position recorded by a resumed run, and mid-example."""
    source = f"hf:{make_dataset(tmp_path / 'ds')}"
    run(source, out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    expected = dir_bytes(tmp_path / "ref" / "out")
    for stop_after in (2, 5):
        interrupt_after(monkeypatch, source, out, stop_after)
    chunks = json.loads((out / outdir.PROGRESS_NAME).read_text())["chunks"]
    assert len(chunks) == 7
    assert any(c["resume_position"]["skip_pieces"] > 0 for c in chunks)  # a task began mid-example
    rows_read[0] = 0
    notes: list[str] = []
    run(source, out, notes)
    assert notes == [] and dir_bytes(out) == expected
    assert rows_read[0] - (SHARDS * ROWS - chunks[-1]["resume_position"]["examples"]) <= REREAD_BOUND


def interrupt_after(monkeypatch, source: str, out: Path, chunks: int) -> None:
    real_close, closed = outdir.ChunkWriter._close, [0]

    def dying_close(self, resume):
        if closed[0] == chunks:
            raise KeyboardInterrupt
        closed[0] += 1
        real_close(self, resume)

    with monkeypatch.context() as mp:
        mp.setattr(outdir.ChunkWriter, "_close", dying_close)
        with pytest.raises(KeyboardInterrupt):
            run(source, out)


def test_without_stream_positions_one_note_and_todays_skip(tmp_path, rows_read, monkeypatch, capsys):
    """A `datasets` without IterableDataset.state_dict (before 2.18): one note on stderr, the source is
    read from its start again, nothing before the resume point is tokenized, and the files are the same."""
    import datasets

    source = f"hf:{make_dataset(tmp_path / 'ds')}"
    run(source, out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    expected = dir_bytes(tmp_path / "ref" / "out")
    monkeypatch.delattr(datasets.IterableDataset, "state_dict")
    interrupt_after(monkeypatch, source, out, 3)
    chunks = json.loads((out / outdir.PROGRESS_NAME).read_text())["chunks"]
    assert len(chunks) == 3 and not any("resume_position" in c for c in chunks)
    rows_read[0] = 0
    capsys.readouterr()
    prepare(PrepareOptions(source, out, progress=False, workers=1, **OPTS))  # the default note
    assert capsys.readouterr().err.splitlines() == [
        f"note: datasets {datasets.__version__} cannot save a streaming dataset's position "
        "(IterableDataset.state_dict needs datasets >= 2.18): reading the source again from its start "
        "to the resume point (without tokenizing it)"
    ]
    assert rows_read[0] == SHARDS * ROWS
    assert dir_bytes(out) == expected


def test_a_position_from_another_datasets_version_is_not_trusted(tmp_path, rows_read, monkeypatch):
    source = f"hf:{make_dataset(tmp_path / 'ds')}"
    run(source, out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    interrupt_after(monkeypatch, source, out, 4)
    path = out / outdir.PROGRESS_NAME
    progress = json.loads(path.read_text())
    progress["chunks"][-1]["resume_position"]["datasets"] = "0.0.1"
    path.write_text(json.dumps(progress))
    rows_read[0] = 0
    notes: list[str] = []
    run(source, out, notes)
    assert len(notes) == 1 and "saved by datasets 0.0.1" in notes[0] and "reading the source again" in notes[0]
    assert rows_read[0] == SHARDS * ROWS
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref" / "out")


def test_a_progress_record_from_before_pieces_version_2_starts_again(tmp_path, monkeypatch):
    source = f"hf:{make_dataset(tmp_path / 'ds')}"
    run(source, out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    interrupt_after(monkeypatch, source, out, 2)
    path = out / outdir.PROGRESS_NAME
    progress = json.loads(path.read_text())
    del progress["pieces"]
    path.write_text(json.dumps(progress))
    notes: list[str] = []
    result = run(source, out, notes)
    assert notes == [
        "the interrupted run was made by an older gpt2lab, which cuts documents differently: starting again"
    ]
    assert result.resumed_chunks == 0 and dir_bytes(out) == dir_bytes(tmp_path / "ref" / "out")


def test_local_files_resume_without_a_note(tmp_path, monkeypatch):
    """Local files keep no stream position: they are read again from disk, as before, without a note."""
    (tmp_path / "a.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
    run(str(tmp_path / "a.txt"), out_in(monkeypatch, tmp_path / "ref"))
    out = out_in(monkeypatch, tmp_path / "k")
    interrupt_after(monkeypatch, str(tmp_path / "a.txt"), out, 3)
    notes: list[str] = []
    run(str(tmp_path / "a.txt"), out, notes)
    assert notes == [] and dir_bytes(out) == dir_bytes(tmp_path / "ref" / "out")
