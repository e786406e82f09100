"""`gpt2lab prepare`: token counts, sources, workers, resume after a kill, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SHAKESPEARE_SHA256, shakespeare_text, subprocess_env

from gpt2lab.data import outdir, read_manifest, shards
from gpt2lab.data import prepare as prepare_module
from gpt2lab.data.prepare import PrepareOptions, prepare
from gpt2lab.data.sources import CORPUS_PRESETS, bundled_text
from gpt2lab.data.text import HARD_PIECE_CHARS, DocumentPieces, safe_cut
from gpt2lab.errors import GPT2LabError


def run(source, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare(PrepareOptions(str(source), out, **kw))


def stream_of(out: Path) -> np.ndarray:
    """All tokens of a prepared directory in stream order (val first, then train)."""
    m = read_manifest(out)
    return np.concatenate([shards.read_shard(out / s["file"]) for s in m["shards"]])


def expected_stream(tok, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        out += [tok.eot_token, *tok.encode_ordinary(d)]
    return out


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --- tokens -----------------------------------------------------------------------------------------


def test_shakespeare_token_count_is_tiktoken_plus_one_eot(tmp_path, tok, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    reference = [tok.eot_token, *tok.encoding.encode_ordinary(text)]
    assert len(reference) == 338_025 + 1
    # Small pieces: the document is cut in ~250 places, which must not change a single token.
    result = run(shakespeare_path, tmp_path / "out", shard_tokens=100_000, piece_chars=4_000)
    m = result.manifest
    assert m["total_tokens"] == len(reference) and m["documents"] == 1
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), reference)
    # auto val: min(one shard, 10%) from the start of the stream; chunk 0 is split into val + train.
    assert m["val_tokens"] == len(reference) // 10 == m["splits"]["val"]["tokens"]
    assert m["splits"]["train"]["tokens"] == len(reference) - m["val_tokens"]
    assert [s["file"] for s in m["shards"]] == [
        "tinyshakespeare_val_000000.bin",
        *(f"tinyshakespeare_train_{i:06d}.bin" for i in range(4)),
    ]
    assert m["tokenizer"] == {"name": "gpt2", "vocab_hash": tok.vocab_hash, "eot_token": 50256}
    for s in m["shards"]:
        assert hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["manifest.json", *(s["file"] for s in m["shards"])])


def test_safe_cuts_never_change_tokens(tok):
    base = "Hello  world!\n\n  It's 2024...\tOK?  \r\n" * 50
    # Limits where every run of text has a safe cut within two pieces' length (no hard cut).
    for text, limits in ((base + " tail   ", (7, 40)), (base + "x" * 300 + " tail   ", (160, 333))):
        whole = tok.encode_ordinary(text)
        for limit in limits:
            doc = DocumentPieces(limit)
            pieces = [p for p, _ in [*doc.add(text), *doc.end()]]
            assert "".join(pieces) == text and len(pieces) > 1
            assert [t for p in pieces for t in tok.encode_ordinary(p)] == whole
    assert safe_cut("aaaa", 2) is None
    assert safe_cut("ab cd ef", 4) == 2 and safe_cut("abcdef gh", 3) == 6
    assert safe_cut("ab cd ef", 4, start=3) == 5 and safe_cut("abcdefgh ij", 2, end=5) is None


def test_text_without_whitespace_is_cut_at_max_chars_on_character_boundaries(tok):
    """No safe cut within 2 * max_chars: cut at max_chars exactly, between whole characters, the same
    places whatever the blocks the text arrives in; only tokens at the cuts can change."""
    text = "€a😀" * 700 + " end"  # 2,104 characters, 6,304 UTF-8 bytes, no whitespace until the end
    # 19 hard cuts, then the safe cut before " end" (within 2 * max_chars of the last one).
    expected = [text[i : i + 100] for i in range(0, 1900, 100)] + [text[1900:2100], " end"]
    for blocks in (len(text), 1, 37, 999):
        doc = DocumentPieces(100)
        pieces = [p for i in range(0, len(text), blocks) for p, _ in doc.add(text[i : i + blocks])]
        pieces += [p for p, _ in doc.end()]
        assert pieces == expected, blocks
    assert b"".join(p.encode() for p in pieces) == text.encode()
    assert [p for p, _ in DocumentPieces(100).whole(text)] == expected
    tokens = [t for p in pieces for t in tok.encode_ordinary(p)]
    assert tok.decode(tokens) == text  # nothing lost or changed in the text
    assert abs(len(tokens) - len(tok.encode_ordinary(text))) <= 2 * (len(pieces) - 1)
    # A document of one character: pieces of max_chars, the last one the rest (at most max_chars);
    # pieces cut without a safe cut are at most HARD_PIECE_CHARS long.
    assert [len(p) for p, _ in DocumentPieces(100).whole("a" * 1050)] == [100] * 10 + [50]
    n = 3 * (1 << 20) + 5
    lengths = [len(p) for p, _ in DocumentPieces(1 << 20).whole("a" * n)]
    k = -(-(n - (1 << 20)) // HARD_PIECE_CHARS)
    assert lengths == [HARD_PIECE_CHARS] * k + [n - k * HARD_PIECE_CHARS]


def test_directory_of_text_files(tmp_path, tok):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("Second file.\n")
    (corpus / "a.md").write_text("# First\n\nMarkdown counts too.")
    (corpus / "sub" / "c.txt").write_text("In a sub-folder, <|endoftext|> is just text.")
    (corpus / "empty.txt").write_text("")
    (corpus / ".hidden.txt").write_text("never read")
    (corpus / "notes.csv").write_text("name,kind\n")
    m = run(corpus, tmp_path / "out", ext=("txt", "md")).manifest
    docs = ["# First\n\nMarkdown counts too.", "Second file.\n", "In a sub-folder, <|endoftext|> is just text."]
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(tok, docs))
    assert m["documents"] == 3 and m["empty_documents_skipped"] == 1 and m["source"]["files"] == 4
    assert m["settings"]["shard_prefix"] == "corpus" and m["source"]["ext"] == ["md", "txt"]
    # Without --ext every file that is text is a document: notes.csv too, in path order.
    m = run(corpus, tmp_path / "all").manifest
    np.testing.assert_array_equal(
        stream_of(tmp_path / "all"), expected_stream(tok, [*docs[:2], "name,kind\n", docs[2]])
    )
    assert m["documents"] == 4 and m["source"]["files"] == 5 and "ext" not in m["source"]


def test_split_on_and_utf8_across_read_blocks(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("gpt2lab.data.sources.files.READ_BYTES", 5)  # separators and characters straddle reads
    docs = ["première ligne", "naïve café ☕", "", "last one\n"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    m = run(tmp_path / "a.txt", tmp_path / "out", split_on="\n\n").manifest
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(tok, [d for d in docs if d]))
    assert m["documents"] == 3 and m["empty_documents_skipped"] == 1 and m["replaced_bytes"] == 0


def test_undecodable_bytes_are_replaced_counted_and_reported(tmp_path, tok, cli):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "c" / "good.txt").write_bytes("fine ✓".encode())
    r = cli("prepare", tmp_path / "c", "--out", tmp_path / "out", "--workers", "1", "--no-progress")
    assert r.code == 0
    assert "3 undecodable byte(s) in 1 file(s)" in r.err and "bad.txt" in r.err
    m = read_manifest(tmp_path / "out")
    assert m["replaced_bytes"] == 3 and m["files_with_replacements"] == 1
    expected = expected_stream(tok, ["caf\ufffd ok \ufffd\ufffd end", "fine ✓"])
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected)


def records():
    return [{"text": "First record.", "id": 1}, {"text": "", "id": 2}, {"text": None, "id": 3}, {"text": "Ünïcode ✓"}]


# A small source tree: four languages, an image, and a hidden folder that is never read.
CODE = {
    "main.py": 'def main() -> None:\n    print("héllo, wörld")\n\n\nif __name__ == "__main__":\n    main()\n',
    "lib/util.c": "#include <stdio.h>\n\nint add(int a, int b) { return a + b; }  /* <|endoftext|> */\n",
    "lib/lib.rs": 'fn main() {\n    println!("{}", 1 + 2);\n}\n',
    "web/app.js": "export const double = (x) => x * 2;\n",
}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01" + bytes(range(256))


def code_tree(root: Path) -> Path:
    for name, text in CODE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "web" / "logo.png").write_bytes(PNG)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n\tbare = false\n")
    return root


def test_a_directory_of_source_code_skips_and_counts_binaries(tmp_path, tok, cli):
    root = code_tree(tmp_path / "code")
    r = cli("prepare", root, "--out", tmp_path / "out", "--workers", "1", "--no-progress")
    assert r.code == 0, r.err
    m = read_manifest(tmp_path / "out")
    texts = [CODE[name] for name in ("lib/lib.rs", "lib/util.c", "main.py", "web/app.js")]  # path order
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(tok, texts))
    assert m["total_tokens"] == sum(len(tok.encoding.encode_ordinary(t)) + 1 for t in texts)
    assert m["documents"] == 4 and m["source"]["files"] == 4 and m["replaced_bytes"] == 0
    assert m["source"]["skipped_files"] == 1
    assert m["source"]["example_skipped_files"] == [str(root / "web" / "logo.png")]
    assert f"note: skipped 1 file(s) that are not UTF-8 text: {root / 'web' / 'logo.png'}" in r.err

    # --ext keeps some suffixes (case-insensitive, with or without the dot); the command records it.
    r = cli("prepare", root, "--ext", ".PY", "--out", tmp_path / "py", "--workers", "1", "--no-progress")
    assert r.code == 0, r.err
    m = read_manifest(tmp_path / "py")
    np.testing.assert_array_equal(stream_of(tmp_path / "py"), expected_stream(tok, [CODE["main.py"]]))
    assert m["source"]["ext"] == ["py"] and "skipped_files" not in m["source"] and "note:" not in r.err
    assert shlex.split(m["command"])[-2:] == ["--ext", "py"]
    r = cli(*shlex.split(m["command"])[1:])
    assert r.code == 0 and "already prepared" in r.out
    r = cli("prepare", f"{root}/**/*", "--ext", "c,rs", "--out", tmp_path / "c-rs", "--workers", "1")
    assert r.code == 0, r.err
    expected = expected_stream(tok, [CODE["lib/lib.rs"], CODE["lib/util.c"]])
    np.testing.assert_array_equal(stream_of(tmp_path / "c-rs"), expected)


def test_text_that_is_not_utf8_is_skipped_in_a_glob_and_read_alone(tmp_path, tok, cli):
    (tmp_path / "ok.c").write_text("int x;\n")
    (tmp_path / "latin1.c").write_bytes(b"/* caf\xe9 */\n")
    (tmp_path / "late-nul.c").write_bytes(b"int y;\n" + b" " * 9000 + b"\x00\n")  # NUL after 8 KB: UTF-8 text
    m = run(f"{tmp_path}/*.c", tmp_path / "out").manifest
    np.testing.assert_array_equal(
        stream_of(tmp_path / "out"), expected_stream(tok, ["int y;\n" + " " * 9000 + "\x00\n", "int x;\n"])
    )
    assert m["source"]["skipped_files"] == 1 and m["source"]["example_skipped_files"] == [str(tmp_path / "latin1.c")]
    # Named on its own, a file is read: undecodable bytes are replaced and counted, as for a .txt file.
    m = run(tmp_path / "latin1.c", tmp_path / "alone").manifest
    np.testing.assert_array_equal(stream_of(tmp_path / "alone"), expected_stream(tok, ["/* caf\ufffd */\n"]))
    assert m["replaced_bytes"] == 1 and "skipped_files" not in m["source"]


def test_jsonl_and_parquet_sources(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    lines = [json.dumps(r) for r in records()]
    (tmp_path / "d.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    pq.write_table(pa.table({"body": [r["text"] for r in records()], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
    expected = expected_stream(tok, ["First record.", "Ünïcode ✓"])
    m = run(tmp_path / "d.jsonl", tmp_path / "j").manifest
    np.testing.assert_array_equal(stream_of(tmp_path / "j"), expected)
    assert m["documents"] == 2 and m["empty_documents_skipped"] == 2
    m = run(tmp_path / "d.parquet", tmp_path / "p", text_field="body").manifest
    np.testing.assert_array_equal(stream_of(tmp_path / "p"), expected)
    assert m["source"]["text_field"] == "body" and m["documents"] == 2


def test_hugging_face_source_streams_with_datasets(tmp_path, tok):
    """The Hub stands in as a local Parquet folder: the same `load_dataset(..., streaming=True)` path."""
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ds" / "data").mkdir(parents=True)
    texts = [f"Document number {i}, with some text." for i in range(50)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    m = run(f"hf:{tmp_path / 'ds'}", tmp_path / "out", shard_tokens=200).manifest
    np.testing.assert_array_equal(stream_of(tmp_path / "out"), expected_stream(tok, texts))
    assert m["source"]["kind"] == "hf" and m["source"]["split"] == "train" and m["documents"] == 50
    with pytest.raises(GPT2LabError, match="no field 'content'"):
        run(f"hf:{tmp_path / 'ds'}", tmp_path / "out2", text_field="content")
    with pytest.raises(GPT2LabError, match="cannot open the Hugging Face dataset"):
        run(f"hf:{tmp_path / 'ds'}", tmp_path / "out3", hf_split="nosuchsplit")


@pytest.mark.subprocess
def test_tinyshakespeare_preset_reads_the_bundled_copy_offline(tmp_path, offline_env, cli, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tinyshakespeare preset must not use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    r = cli("prepare", "tinyshakespeare", "--out", tmp_path / "out", "--no-progress")
    assert r.code == 0, r.err
    m = read_manifest(tmp_path / "out")
    assert m["source"]["preset"] == "tinyshakespeare" and m["total_tokens"] == 338_026
    assert m["source"]["sha256"] == SHAKESPEARE_SHA256
    assert m["source"]["url"] == CORPUS_PRESETS["tinyshakespeare"].url  # where the bundled text comes from
    assert m["shards"][0]["file"] == "tinyshakespeare_val_000000.bin"
    cached = offline_env / "gpt2lab" / "tinyshakespeare.txt"
    assert m["source"]["path"] == str(cached)
    assert cached.read_text(encoding="utf-8") == shakespeare_text()
    # The recorded command is runnable and recognises the finished directory.
    r = cli(*shlex.split(m["command"])[1:])
    assert r.code == 0 and "already prepared" in r.out
    # A damaged copy in the cache is replaced from the package, not used.
    cached.write_text("not Shakespeare", encoding="utf-8")
    assert bundled_text(CORPUS_PRESETS["tinyshakespeare"]) == cached
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SHAKESPEARE_SHA256


def test_a_damaged_bundle_is_a_clear_error(offline_env):
    wrong = dataclasses.replace(CORPUS_PRESETS["tinyshakespeare"], name="wrong-hash", sha256="0" * 64)
    with pytest.raises(GPT2LabError, match=f"has sha256 {SHAKESPEARE_SHA256}, expected 0{{64}}: .* reinstall"):
        bundled_text(wrong)
    missing = dataclasses.replace(CORPUS_PRESETS["tinyshakespeare"], name="missing", bundled="missing.txt.gz")
    with pytest.raises(GPT2LabError, match="cannot unpack the bundled missing text .*missing.txt.gz"):
        bundled_text(missing)
    cache = offline_env / "gpt2lab"
    assert sorted(p.name for p in cache.iterdir()) == []  # no partial file under any name


# --- determinism and resume -------------------------------------------------------------------------


@pytest.mark.subprocess
def test_one_and_two_workers_write_identical_shards(tmp_path, shakespeare_path, monkeypatch):
    opts = {"shard_tokens": 30_000, "piece_chars": 20_000, "val_tokens": 45_000}
    for workers in (1, 2):
        (tmp_path / f"w{workers}").mkdir()
        monkeypatch.chdir(tmp_path / f"w{workers}")
        run(shakespeare_path, "out", workers=workers, **opts)
    one, two = dir_bytes(tmp_path / "w1" / "out"), dir_bytes(tmp_path / "w2" / "out")
    assert one == two  # manifest.json included
    m = json.loads(one["manifest.json"])
    assert [s["file"] for s in m["shards"][:3]] == [
        "tinyshakespeare_val_000000.bin",
        "tinyshakespeare_val_000001.bin",  # val_tokens straddles chunk 1: split into val and train
        "tinyshakespeare_train_000001.bin",
    ]
    assert m["splits"]["val"]["tokens"] == 45_000


@pytest.mark.parametrize("val_tokens", [None, 25_000])
def test_interrupted_run_resumes_to_identical_output(tmp_path, shakespeare_path, monkeypatch, val_tokens):
    opts = {"shard_tokens": 30_000, "piece_chars": 40_000, "val_tokens": val_tokens}
    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path / "ref")
    run(shakespeare_path, "out", **opts)
    reference = dir_bytes(tmp_path / "ref" / "out")

    # Interrupted after 0, 1, 6 or all 12 chunks; "all" dies while writing the manifest, after the
    # chunk straddling the val boundary has been split.
    for stop_after in (0, 1, 6, 12):
        (tmp_path / f"k{stop_after}").mkdir()
        monkeypatch.chdir(tmp_path / f"k{stop_after}")
        real_close, closed = outdir.ChunkWriter._close, []

        def dying_close(self, resume, real_close=real_close, closed=closed, stop_after=stop_after):
            if len(closed) == stop_after:
                raise KeyboardInterrupt
            closed.append(1)
            real_close(self, resume)

        def dying_manifest(path, obj, real_write=prepare_module.atomic_write_json):
            if Path(path).name == "manifest.json":
                raise KeyboardInterrupt
            real_write(path, obj)

        with monkeypatch.context() as mp:
            mp.setattr(outdir.ChunkWriter, "_close", dying_close)
            mp.setattr(prepare_module, "atomic_write_json", dying_manifest)
            with pytest.raises(KeyboardInterrupt):
                run(shakespeare_path, "out", **opts)
        assert not Path("out/manifest.json").exists()
        result = run(shakespeare_path, "out", **opts)
        assert result.resumed_chunks == stop_after
        if stop_after == 12:
            assert result.tokenized == 0  # only the manifest was missing
        elif stop_after > 0:  # tokenizing restarts at the task holding the first missing chunk's start
            assert 338_026 - stop_after * 30_000 <= result.tokenized < 338_026
        assert dir_bytes(Path("out")) == reference


@pytest.mark.subprocess
def test_sigkill_then_rerun_gives_identical_output(tmp_path, shakespeare_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        os.symlink(shakespeare_path, corpus / f"part{i}.txt")
    args = [str(corpus), "--out", "out", "--shard-tokens", "20000", "--workers", "2"]
    (tmp_path / "killed").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "prepare", *args, "--no-progress"],
        cwd=tmp_path / "killed",
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    out = tmp_path / "killed" / "out"
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(list(out.glob("*_train_*.bin"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"prepare finished before it could be killed: {proc.stderr.read()}"
    assert not (out / "manifest.json").exists() and (out / outdir.PROGRESS_NAME).exists()

    monkeypatch.chdir(tmp_path / "killed")
    opts = {"shard_tokens": 20_000, "workers": 2}
    resumed = run(corpus, "out", **opts)
    assert resumed.resumed_chunks >= 2
    (tmp_path / "clean").mkdir()
    monkeypatch.chdir(tmp_path / "clean")
    run(corpus, "out", **opts)
    assert dir_bytes(tmp_path / "killed" / "out") == dir_bytes(tmp_path / "clean" / "out")
    # val is all of chunk 0 here (auto: min(one shard, 10%)), so one shard per chunk.
    assert len(read_manifest(tmp_path / "clean" / "out")["shards"]) == -(-4 * 338_026 // 20_000)


# --- the output directory ---------------------------------------------------------------------------


@pytest.mark.subprocess
def test_rerun_is_a_no_op_and_other_corpora_are_not_overwritten(tmp_path, cli):
    (tmp_path / "a.txt").write_text("corpus A " * 300)
    (tmp_path / "b.txt").write_text("corpus B " * 300)
    out = tmp_path / "out"
    assert cli("prepare", tmp_path / "a.txt", "--out", out, "--workers", "1", "--no-progress").code == 0
    before = dir_bytes(out)
    r = cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress")
    assert r.code == 0 and "already prepared" in r.out and dir_bytes(out) == before
    r = cli("prepare", tmp_path / "b.txt", "--out", out, "--no-progress")
    assert r.code == 1 and "another corpus" in r.err and "--overwrite" in r.err and dir_bytes(out) == before
    r = cli("prepare", tmp_path / "a.txt", "--out", out, "--shard-tokens", "100", "--no-progress")
    assert r.code == 1 and "shard_tokens 100000000 there, 100 now" in r.err
    r = cli("prepare", tmp_path / "b.txt", "--out", out, "--overwrite", "--no-progress")
    assert r.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["b_train_000000.bin", "b_val_000000.bin", "manifest.json"]


def test_non_empty_directory_is_refused(tmp_path, cli):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.me").write_text("mine")
    r = cli("prepare", tmp_path / "a.txt", "--out", tmp_path / "out", "--no-progress")
    assert r.code == 1 and "is not empty (it has keep.me)" in r.err


@pytest.mark.subprocess
def test_manifest_made_with_another_tokenizer(tmp_path, cli):
    (tmp_path / "a.txt").write_text("some text " * 100)
    out = tmp_path / "out"
    assert cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress").code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["tokenizer"]["vocab_hash"] = "0" * 64
    m["fingerprint"] = "changed"
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress")
    assert r.code == 1 and "another tokenizer" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_truncated_shard_in_a_prepared_directory_is_named(tmp_path, cli):
    (tmp_path / "a.txt").write_text("some text " * 100)
    out = tmp_path / "out"
    assert cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress").code == 0
    shard = out / "a_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    r = cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress")
    assert r.code == 1 and str(shard) in r.err and "truncated" in r.err and "--overwrite" in r.err
    before = shard.stat().st_size
    assert cli("prepare", tmp_path / "a.txt", "--out", out, "--no-progress", "--overwrite").code == 0  # as it says
    assert shard.stat().st_size == before + 3 and shards.read_header(shard) == (before + 3 - 1024) // 2


# --- bad input --------------------------------------------------------------------------------------


def bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "small.txt").write_text("A few words.")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "blank_dir").mkdir()
    (tmp_path / "blank_dir" / "x.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": nope}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 5}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "logo.png").write_bytes(PNG)
    return [
        (["missing.txt"], "missing.txt: no such file, directory or preset"),
        (["someone/dataset"], "write hf:someone/dataset"),
        ([str(tmp_path / "*.nothing")], "the pattern matches no files"),
        ([str(tmp_path / "empty.txt")], "empty corpus"),
        ([str(tmp_path / "empty_dir")], "empty_dir: no files in this directory (hidden ones are skipped)"),
        ([str(tmp_path / "blank_dir")], "empty corpus: there is no text in it (1 empty documents)"),
        ([str(tmp_path / "bad.jsonl")], f"{tmp_path / 'bad.jsonl'}:3: not valid JSON"),
        ([str(tmp_path / "nofield.jsonl")], f"{tmp_path / 'nofield.jsonl'}:2: no field 'text' (fields: body)"),
        ([str(tmp_path / "number.jsonl")], "field 'text' is a int, not a string"),
        ([str(tmp_path / "nocol.parquet")], f"{tmp_path / 'nocol.parquet'}: no column 'text' (columns: body)"),
        ([str(tmp_path / "junk.parquet")], "not a readable Parquet file"),
        ([str(tmp_path / "empty.txt"), "--shard-tokens", "0"], "--shard-tokens must be between 1"),
        ([str(tmp_path / "small.txt"), "--val-tokens", "1M"], "--val-tokens 1000000 leaves no training tokens"),
        (["hf:"], "give the dataset name after 'hf:'"),
        ([str(tmp_path / "images" / "logo.png")], "logo.png: a binary file (it has a NUL byte in its first 8192"),
        ([str(tmp_path / "images")], "images: none of its 1 file(s) is UTF-8 text (first: "),
        ([str(tmp_path / "images"), "--ext", "py"], "images: no .py files in this directory"),
        ([str(tmp_path / "*.txt"), "--ext", "md,rst"], "the pattern matches no .md, .rst files"),
        ([str(tmp_path / "small.txt"), "--ext", "py"], "small.txt: not a .py file, as --ext asks"),
        (["tinyshakespeare", "--ext", "txt"], "--ext selects local files by suffix; 'tinyshakespeare' is a preset"),
    ]


def test_bad_input_gives_one_line_and_exit_1(tmp_path, cli):
    pytest.importorskip("pyarrow")
    for args, message in bad_input_cases(tmp_path):
        out = tmp_path / "out"
        r = cli("prepare", *args, "--out", out, "--workers", "1", "--no-progress")
        assert r.code == 1, (args, r.err)
        assert message in r.err, (args, r.err)
        assert r.err.startswith("gpt2lab prepare: error: ") and len(r.err.strip().splitlines()) == 1, r.err
        assert not out.exists() or not any(p.suffix == ".bin" for p in out.iterdir()), args
        shutil.rmtree(out, ignore_errors=True)


def test_cli_help_and_bad_count(cli):
    r = cli("prepare", "--help")
    assert r.code == 0 and "fineweb-edu-10B" in r.out and "hf:NAME" in r.out
    r = cli("prepare", "x.txt", "--out", "o", "--shard-tokens", "lots")
    assert r.code == 2 and "not a token count" in r.err
    r = cli("prepare", "x.txt", "--out", "o", "--ext", "py,,c")
    assert r.code == 2 and "argument --ext: '' is not a file suffix; give suffixes like py,c,rs" in r.err


@pytest.mark.subprocess
def test_subprocess_exit_code_for_bad_input(tmp_path):
    """A real process: one line on stderr, exit status 1, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "gpt2lab", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no such file" in r.stderr
