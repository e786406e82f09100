"""Chat data: the loss mask file beside each token shard, and `gpt2lab prepare` on conversations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.chat import ChatTemplate, check_messages
from gpt2lab.data import outdir, read_manifest, shards
from gpt2lab.data.prepare import PrepareOptions, prepare
from gpt2lab.errors import GPT2LabError


def mask_bytes(mask) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20241207, 1, len(mask)]
    return header.tobytes() + np.asarray(mask, dtype=np.uint8).tobytes()


def test_mask_file_layout_round_trip_and_hash(tmp_path):
    mask = np.random.default_rng(0).integers(0, 2, size=5000)
    name, sha = shards.write_mask(tmp_path / "c_train_000000.mask", mask)
    data = (tmp_path / "c_train_000000.mask").read_bytes()
    assert name == "c_train_000000.mask" and sha == hashlib.sha256(data).hexdigest()
    assert data == mask_bytes(mask) and len(data) == 1024 + 5000
    opened = shards.open_mask(tmp_path / "c_train_000000.mask")
    assert opened.dtype == np.uint8 and not opened.flags.writeable
    np.testing.assert_array_equal(opened, mask)
    assert shards.MASK_MAGIC == 20241207
    assert [p.name for p in tmp_path.iterdir()] == ["c_train_000000.mask"]  # no temp file left


def test_empty_mask_and_streaming_writer(tmp_path):
    shards.write_mask(tmp_path / "e.mask", [])
    assert shards.open_mask(tmp_path / "e.mask").shape == (0,)
    mask = np.arange(100) % 3 == 0
    with shards.MaskWriter(tmp_path / "s.mask") as w:
        for part in np.array_split(mask, 4):
            w.write(part)
        w.close()
    assert (tmp_path / "s.mask").read_bytes() == mask_bytes(mask)


def test_mask_values_other_than_0_and_1_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only 0 and 1"):
        shards.write_mask(tmp_path / "bad.mask", [0, 1, 2])
    assert list(tmp_path.iterdir()) == []


MASK_DAMAGE = {
    "cut": (lambda b: b[:-1], "truncated: the header says 100 mask values (1124 bytes) but the file has 1123"),
    "long": (lambda b: b + b"\0", "has trailing bytes"),
    "header": (lambda b: b[:100], "truncated mask (100 bytes, shorter than the 1024-byte header)"),
    "magic": (lambda b: np.int32(20240520).tobytes() + b[4:], "not a loss mask file (magic number 20240520"),
    "version": (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "mask version 2 is not supported"),
}


def test_damaged_masks_name_the_file(tmp_path):
    for case, (damage, message) in MASK_DAMAGE.items():
        path = tmp_path / f"{case}_train_000000.mask"
        path.write_bytes(damage(mask_bytes(np.ones(100))))
        with pytest.raises(GPT2LabError) as e:
            shards.open_mask(path)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_token_shard_is_not_a_mask(tmp_path):
    shards.write_shard(tmp_path / "x.bin", np.arange(10))
    with pytest.raises(GPT2LabError, match="not a loss mask file"):
        shards.open_mask(tmp_path / "x.bin")


def write_chat_dir(root, parts: dict[str, list[tuple[np.ndarray, np.ndarray]]], template=True):
    """A prepared directory by hand: shards, masks and a manifest (with or without a chat template)."""
    root.mkdir(exist_ok=True)
    entries = []
    for split, pairs in parts.items():
        for i, (tokens, mask) in enumerate(pairs):
            info = shards.write_shard(root / f"c_{split}_{i:06d}.bin", tokens, split)
            entry = info.to_json()
            if mask is not None:
                entry["mask"], entry["mask_sha256"] = shards.write_mask(root / shards.mask_name(info.file), mask)
            entries.append(entry)
    manifest = {"format": "gpt2lab-shards", "format_version": 1, "shards": entries}
    if template:
        manifest["chat_template"] = {"name": "gpt2lab-chat"}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_split_masks_read_as_one_uint8_sequence_aligned_with_the_tokens(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [37, 0, 100]
    pairs = [(rng.integers(0, 50261, n), rng.integers(0, 2, n)) for n in lengths]
    write_chat_dir(tmp_path, {"train": pairs, "val": [(np.arange(5), np.array([0, 1, 1, 0, 1]))]})
    masks = shards.open_split_masks(tmp_path, "train")
    tokens = shards.open_split_tokens(tmp_path, "train")
    assert len(masks) == len(tokens) == 137
    assert masks.names == [f"c_train_00000{i}.mask" for i in range(3)]
    got = masks.read(30, 20)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.concatenate([pairs[0][1][30:], pairs[2][1][:13]]))
    np.testing.assert_array_equal(masks[0:137], np.concatenate([p[1] for p in pairs]))
    assert masks.permuted([2, 0, 1]).read(0, 3).dtype == np.uint8
    assert shards.open_split_masks(tmp_path, "val")[0:5].tolist() == [0, 1, 1, 0, 1]


def test_text_data_has_no_masks(tmp_path):
    msg = (
        f"{tmp_path} has no loss masks: it was not prepared from chat data "
        "(prepare it from records with a 'messages' field)"
    )
    write_chat_dir(tmp_path, {"train": [(np.arange(10), None)]}, template=False)
    with pytest.raises(GPT2LabError) as e:
        shards.open_split_masks(tmp_path, "train")
    assert str(e.value) == msg
    llmc = tmp_path / "llmc"
    llmc.mkdir()
    shards.write_shard(llmc / "fineweb_train_000001.bin", np.arange(10))
    with pytest.raises(GPT2LabError, match="has no loss masks: it was not prepared from chat data"):
        shards.open_split_masks(llmc, "train")


def test_a_mask_that_does_not_match_its_shard(tmp_path):
    write_chat_dir(tmp_path, {"train": [(np.arange(10), np.ones(10))]})
    shards.write_mask(tmp_path / "c_train_000000.mask", np.ones(9))
    with pytest.raises(GPT2LabError, match="holds 9 mask values but its shard c_train_000000.bin has 10 tokens"):
        shards.open_split_masks(tmp_path, "train")
    (tmp_path / "c_train_000000.mask").unlink()
    with pytest.raises(GPT2LabError, match="c_train_000000.mask is listed in .* but missing"):
        shards.open_split_masks(tmp_path, "train")


# --- gpt2lab prepare on conversations ----------------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "violet", "ember", "quartz", "meadow", "ünïcödé", "東京"]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of 1 to 3 exchanges, some with a system prompt, some long enough to span shards."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        conv = [{"role": "system", "content": f"You are helper {i}."}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
            conv += [{"role": "user", "content": f"reverse: {words}"}, {"role": "assistant", "content": words[::-1]}]
        out.append(conv)
    return out


BAD = [
    ({"messages": [{"role": "user", "content": "hello?"}]}, "the conversation has no assistant reply with text"),
    (
        {"messages": [{"role": "bot", "content": "hi"}]},
        "message 0 has role 'bot'; the roles are system, user and assistant",
    ),
    ({"messages": []}, "'messages' must be a non-empty list of {role, content} objects"),
    ({"messages": "hello"}, "'messages' must be a non-empty list of {role, content} objects"),
    ({"text": "a text record"}, "no 'messages' field (fields: text)"),
    ([1, 2], "no 'messages' field (a JSON list, not an object)"),
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run(source, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare(PrepareOptions(str(source), out, **kw))


def rendered(convs, tok) -> tuple[list[int], list[int]]:
    template = ChatTemplate.for_tokenizer(tok)
    ids, mask = [], []
    for conv in convs:
        i, m = template.render(check_messages(conv), tok)
        ids += i
        mask += m
    return ids, mask


def stream_and_mask(out: Path) -> tuple[list[int], list[int]]:
    m = read_manifest(out)
    ids = np.concatenate([shards.read_shard(out / s["file"]) for s in m["shards"]])
    mask = np.concatenate([np.array(shards.open_mask(out / s["mask"])) for s in m["shards"]])
    return ids.tolist(), mask.tolist()


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def killed_at_chunk(index: int):
    """ChunkWriter._close that stops the run (as Ctrl-C would) instead of closing chunk `index`."""
    real_close = outdir.ChunkWriter._close

    def close(self, resume):
        if self.index == index:
            raise KeyboardInterrupt
        real_close(self, resume)

    return close


def test_jsonl_conversations_are_rendered_exactly_with_masks_and_manifest(tmp_path, tok):
    convs = conversations(40)
    records = [{"messages": c, "source": "synthetic"} for c in convs]
    records[5:5] = [r for r, _ in BAD]
    src = write_jsonl(tmp_path / "talk.jsonl", records)
    m = run(src, tmp_path / "out", shard_tokens=700, val_tokens=300).manifest
    ids, mask = rendered(convs, tok)
    assert stream_and_mask(tmp_path / "out") == (ids, mask)
    assert ids.count(tok.eot_token) == 40 and max(ids) == 50260  # <|end|>; starts are the only EOTs
    template = ChatTemplate.for_tokenizer(tok)
    assert m["chat_template"] == template.to_record() and m["settings"]["format"] == "chat"
    assert m["conversations"] == m["documents"] == 40 and m["total_tokens"] == len(ids)
    assert m["learned_tokens"] == sum(mask) == sum(s["learned_tokens"] for s in m["shards"])
    assert m["splits"]["val"] == {"tokens": 300, "shards": 1, "learned_tokens": sum(mask[:300])}
    assert m["splits"]["train"]["learned_tokens"] == sum(mask[300:])
    assert m["mask_format"] == {"magic": 20241207, "version": 1, "header_bytes": 1024, "dtype": "uint8"}
    assert m["skipped_conversations"] == len(BAD)
    assert m["example_skipped_conversations"] == [f"{src}:{6 + i}: {why}" for i, (_, why) in enumerate(BAD[:5])]
    assert m["source"]["messages_field"] == "messages" and "text_field" not in m["source"]
    for s in m["shards"]:
        assert s["mask"] == s["file"].replace(".bin", ".mask")
        assert s["mask_sha256"] == hashlib.sha256((tmp_path / "out" / s["mask"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["manifest.json", *(f for s in m["shards"] for f in (s["file"], s["mask"]))]
    )
    # The reader's side: the data's tokenizer has the chat tokens; masks line up with the tokens.
    data_tok = shards.data_tokenizer(tmp_path / "out")
    assert data_tok.n_vocab == 50261 and data_tok.decode([50257, 50260]) == "<|system|><|end|>"
    assert shards.open_split_masks(tmp_path / "out", "train")[0 : len(ids) - 300].tolist() == mask[300:]


def test_two_workers_and_resume_after_a_kill_give_identical_shards_and_masks(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "talk.jsonl", [{"messages": c} for c in conversations(150, seed=1)])
    opts = {"shard_tokens": 1500, "piece_chars": 3000, "val_tokens": 2000}

    def in_dir(name: str) -> Path:  # the same --out in every run: the manifest records the command
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        return tmp_path / name / "out"

    in_dir("ref")
    run(src, "out", **opts)
    reference = dir_bytes(tmp_path / "ref" / "out")
    assert len(read_manifest(tmp_path / "ref" / "out")["shards"]) >= 8
    in_dir("two")
    run(src, "out", workers=2, **opts)
    assert dir_bytes(tmp_path / "two" / "out") == reference
    for stop_after in (1, 4):
        out = in_dir(f"k{stop_after}")
        with monkeypatch.context() as mp:
            mp.setattr(outdir.ChunkWriter, "_close", killed_at_chunk(stop_after))
            with pytest.raises(KeyboardInterrupt):
                run(src, "out", **opts)
        kept = sorted(p.suffix for p in out.iterdir() if p.suffix in (".bin", ".mask"))
        assert kept == [".bin"] * stop_after + [".mask"] * stop_after  # complete chunks only, each with its mask
        result = run(src, "out", **opts)
        assert result.resumed_chunks == stop_after and result.tokenized > 0
        assert dir_bytes(out) == reference


def test_hf_chat_dataset_from_local_parquet_offline(tmp_path, tok, monkeypatch):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = conversations(30, seed=2)
    rows = [*convs[:10], [{"role": "user", "content": "unanswered"}], *convs[10:]]
    (tmp_path / "ds" / "data").mkdir(parents=True)
    table = pa.table({"messages": rows, "source": ["s"] * len(rows)})
    pq.write_table(table, tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    m = run(f"hf:{tmp_path / 'ds'}", tmp_path / "out", shard_tokens=500).manifest
    assert stream_and_mask(tmp_path / "out") == rendered(convs, tok)
    assert m["source"]["kind"] == "hf" and m["source"]["messages_field"] == "messages"
    assert m["conversations"] == 30 and m["skipped_conversations"] == 1
    assert m["example_skipped_conversations"][0].endswith(
        "split 'train', example 11: the conversation has no assistant reply with text"
    )
    # Killed after four chunks (past the bad row), resumed from the dataset's recorded stream position:
    # the same data, and the skipped record counted once.
    with monkeypatch.context() as mp:
        mp.setattr(outdir.ChunkWriter, "_close", killed_at_chunk(4))
        with pytest.raises(KeyboardInterrupt):
            run(f"hf:{tmp_path / 'ds'}", tmp_path / "killed", shard_tokens=500, piece_chars=400)
    resumed = run(f"hf:{tmp_path / 'ds'}", tmp_path / "killed", shard_tokens=500, piece_chars=400)
    assert resumed.resumed_chunks == 4 and resumed.tokenized < resumed.manifest["total_tokens"] - 1700
    assert stream_and_mask(tmp_path / "killed") == rendered(convs, tok)
    assert resumed.manifest["skipped_conversations"] == 1
    assert resumed.manifest["example_skipped_conversations"] == m["example_skipped_conversations"]
    # The same rows as a local Parquet file, and --format text reads its 'source' column as text.
    pq.write_table(table, tmp_path / "talk.parquet")
    run(tmp_path / "talk.parquet", tmp_path / "local", shard_tokens=500)
    assert stream_and_mask(tmp_path / "local") == rendered(convs, tok)
    assert read_manifest(tmp_path / "local")["example_skipped_conversations"] == [
        f"{tmp_path / 'talk.parquet'}: row 11: the conversation has no assistant reply with text"
    ]
    text = run(tmp_path / "talk.parquet", tmp_path / "text", text_field="source").manifest
    assert "chat_template" not in text and text["documents"] == 31


def test_a_trained_tokenizer_gets_the_chat_tokens_past_its_vocabulary(tmp_path, shakespeare_path):
    from gpt2lab.tokenizer_train import save_trained, train_bpe

    text = shakespeare_path.read_text()[:50_000]
    trained = save_trained(train_bpe(text.split("\n\n"), 400, progress=False), tmp_path / "tok")
    convs = conversations(12, seed=3)
    src = write_jsonl(tmp_path / "talk.jsonl", [{"messages": c} for c in convs])
    m = run(src, tmp_path / "out", tokenizer=str(trained.path), val_tokens=100).manifest
    assert m["chat_template"]["tokens"] == {"<|system|>": 400, "<|user|>": 401, "<|assistant|>": 402, "<|end|>": 403}
    assert m["chat_template"]["bos_id"] == trained.eot_token
    assert stream_and_mask(tmp_path / "out") == rendered(convs, trained)
    data_tok = shards.data_tokenizer(tmp_path / "out")
    assert data_tok.n_vocab == 404 and data_tok.vocab_hash == trained.vocab_hash


def test_all_records_bad_is_one_clear_error_and_leaves_nothing(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD])
    with pytest.raises(GPT2LabError) as e:
        run(src, tmp_path / "out", data_format="chat")
    assert str(e.value) == (
        f"{src}: no conversation to train on: all 6 record(s) were skipped (first: {src}:1: the conversation has "
        "no assistant reply with text); each record needs a 'messages' list with an assistant reply"
    )
    assert not (tmp_path / "out").exists()


def test_format_choice(tmp_path, tok):
    convs = conversations(3)
    src = write_jsonl(tmp_path / "t.jsonl", [{"messages": c, "text": f"doc {i}"} for i, c in enumerate(convs)])
    assert "chat_template" in run(src, tmp_path / "auto").manifest
    m = run(src, tmp_path / "field", text_field="text").manifest  # a text field named: text
    assert "chat_template" not in m and m["documents"] == 3
    assert "chat_template" not in run(src, tmp_path / "text", data_format="text").manifest
    (tmp_path / "plain.txt").write_text("just text")
    with pytest.raises(GPT2LabError, match="chat data must be JSONL, Parquet or hf: records with a 'messages'"):
        run(tmp_path / "plain.txt", tmp_path / "x", data_format="chat")
    assert "chat_template" not in run(tmp_path / "plain.txt", tmp_path / "plain").manifest
    opts = PrepareOptions(str(src), "o", data_format="chat")
    assert opts.command() == f"gpt2lab prepare {src} --out o --format chat"


def test_cli_reports_conversations_and_skipped_records(tmp_path, cli):
    records = [{"messages": c} for c in conversations(4)] + [BAD[0][0]]
    src = write_jsonl(tmp_path / "c.jsonl", records)
    r = cli("prepare", src, "--out", tmp_path / "out", "--no-progress", "--workers", "1", "--val-tokens", "10")
    m = read_manifest(tmp_path / "out")
    assert r.code == 0 and f"from 4 chat conversation(s) into {tmp_path / 'out'}" in r.out
    assert f"loss on {m['learned_tokens']:,} assistant token(s)" in r.out
    assert r.err.strip() == (
        f"note: skipped 1 bad record(s), first: {src}:5: the conversation has no assistant reply with text"
    )
    r = cli("prepare", src, "--out", tmp_path / "o2", "--format", "xml")
    assert r.code == 2 and "invalid choice: 'xml'" in r.err


def test_a_complete_chat_directory_is_checked_on_rerun(tmp_path, cli):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in conversations(20)])
    args = ("prepare", src, "--out", tmp_path / "out", "--no-progress", "--workers", "1", "--shard-tokens", "400")
    assert cli(*args).code == 0
    r = cli(*args)
    assert r.code == 0 and "is already prepared" in r.out
    entry = read_manifest(tmp_path / "out")["shards"][2]
    mask = tmp_path / "out" / entry["mask"]
    assert entry["tokens"] == 400
    mask.write_bytes(mask.read_bytes()[:-1])
    r = cli(*args)
    assert r.code == 1 and r.err.strip() == (
        f"gpt2lab prepare: error: {mask}: truncated: the header says 400 mask values (1424 bytes) but the file "
        "has 1423 bytes; "
        "run this command again with --overwrite to rebuild the shards"
    )
    mask.unlink()
    r = cli(*args)
    assert r.code == 1 and f"{mask} is listed in the manifest but missing" in r.err
    assert cli(*args, "--overwrite").code == 0 and mask.is_file()
    (tmp_path / "plain.txt").write_text("text")
    r = cli("prepare", tmp_path / "plain.txt", "--out", tmp_path / "o", "--format", "chat")
    assert r.code == 1 and r.err.count("\n") == 1 and "chat data must be JSONL, Parquet or hf: records" in r.err
