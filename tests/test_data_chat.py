"""Chat data: the loss mask file beside each token shard, and `gpt2lab prepare` on conversations."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gpt2lab.data import shards
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
