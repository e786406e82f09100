"""The shard file format (llm.c's .bin layout), the manifest helpers and the flat split view."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gpt2lab.data import shards
from gpt2lab.errors import GPT2LabError


def llmc_shard_bytes(tokens: np.ndarray) -> bytes:
    """A shard made exactly as llm.c's dev/data/data_common.py write_datafile does (version 1)."""
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520  # magic
    header[1] = 1  # version: uint16 tokens
    header[2] = len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=12_345).astype(np.uint16)
    info = shards.write_shard(tmp_path / "a_train_000000.bin", tokens, "train")
    assert info.tokens == len(tokens) and info.file == "a_train_000000.bin" and info.split == "train"
    assert info.sha256 == hashlib.sha256((tmp_path / "a_train_000000.bin").read_bytes()).hexdigest()
    assert (tmp_path / "a_train_000000.bin").stat().st_size == 1024 + 2 * len(tokens)
    np.testing.assert_array_equal(shards.read_shard(tmp_path / "a_train_000000.bin"), tokens)
    assert shards.read_header(tmp_path / "a_train_000000.bin") == len(tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["a_train_000000.bin"]  # no temp file left


def test_header_matches_llmc_layout_both_ways(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 50
    (tmp_path / "llmc.bin").write_bytes(llmc_shard_bytes(tokens))
    np.testing.assert_array_equal(shards.open_shard(tmp_path / "llmc.bin"), tokens)
    shards.write_shard(tmp_path / "ours.bin", tokens)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "llmc.bin").read_bytes()
    header = np.fromfile(tmp_path / "ours.bin", dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 1000] and not header[3:].any()


def test_streaming_writer_equals_one_write_and_discard_leaves_nothing(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    with shards.ShardWriter(tmp_path / "s.bin", "val") as w:
        for part in np.array_split(tokens, 7):
            w.write(part)
        info = w.close()
    assert info.tokens == 5000
    assert (tmp_path / "s.bin").read_bytes() == llmc_shard_bytes(tokens)
    w = shards.ShardWriter(tmp_path / "gone.bin", "train")
    w.write(tokens)
    w.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-2], "truncated"),
        (lambda b: b + b"\0\0", "trailing bytes"),
        (lambda b: b[:500], "truncated shard"),
        (lambda b: np.int32(1234).tobytes() + b[4:], r"not a token shard \(magic number 1234"),
        (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "version 2"),
    ],
)
def test_damaged_shards_name_the_file(tmp_path, damage, message):
    path = tmp_path / "bad_train_000001.bin"
    path.write_bytes(damage(llmc_shard_bytes(np.arange(100))))
    with pytest.raises(GPT2LabError, match=message) as e:
        shards.open_shard(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_token_sequence_slices_across_shards():
    # An empty shard in the middle and at the end must not break position lookups.
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(0), np.arange(13, 40), np.arange(0)]
    parts = [p.astype(np.uint16) for p in parts]
    seq = shards.TokenSequence(parts)
    assert len(seq) == 40
    flat = np.arange(40)
    for a, b in [(0, 40), (5, 12), (9, 11), (12, 13), (10, 10), (39, 40), (0, 1)]:
        np.testing.assert_array_equal(seq[a:b], flat[a:b])
    np.testing.assert_array_equal(seq.permuted([1, 0, 2, 3])[0:5], [10, 11, 12, 0, 1])
    with pytest.raises(IndexError):
        seq.read(35, 10)


def test_llmc_directory_without_manifest_is_read_by_name(tmp_path):
    for name, toks in [("fw_val_000000.bin", [1, 2]), ("fw_train_000002.bin", [5]), ("fw_train_000001.bin", [3, 4])]:
        (tmp_path / name).write_bytes(llmc_shard_bytes(np.array(toks)))
    names = [p.name for p in shards.split_shard_paths(tmp_path, "train")]
    assert names == ["fw_train_000001.bin", "fw_train_000002.bin"]
    np.testing.assert_array_equal(shards.open_split_tokens(tmp_path, "train")[0:3], [3, 4, 5])
    np.testing.assert_array_equal(shards.open_split_tokens(tmp_path, "val")[0:2], [1, 2])
    with pytest.raises(GPT2LabError, match="unknown split"):
        shards.split_shard_paths(tmp_path, "test")


def test_manifest_errors(tmp_path):
    with pytest.raises(GPT2LabError, match=r"manifest\.json not found"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(GPT2LabError, match="not valid JSON"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(GPT2LabError, match="not a gpt2lab shard manifest"):
        shards.read_manifest(tmp_path)
    with pytest.raises(GPT2LabError, match="not found"):
        shards.open_split_tokens(tmp_path / "missing", "train")


def test_manifest_token_count_and_tokenizer_are_checked(tmp_path):
    info = shards.write_shard(tmp_path / "c_train_000000.bin", np.arange(10), "train")
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "format_version": shards.MANIFEST_VERSION,
        "tokenizer": {"name": "gpt2", "vocab_hash": "0" * 64},
        "shards": [{**info.to_json(), "tokens": 11}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GPT2LabError, match=r"holds 10 tokens but .* lists 11"):
        shards.open_split_tokens(tmp_path, "train")

    class OtherTokenizer:
        name, vocab_hash = "gpt2", "f" * 64

    with pytest.raises(GPT2LabError, match=r"tokenized with 'gpt2' .* prepare the data again"):
        shards.check_tokenizer(shards.read_manifest(tmp_path), OtherTokenizer(), tmp_path)
