"""ShardLoader: (x, y) shapes, rank-disjoint windows, no token lost at shard boundaries, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt2lab.data import ShardLoader, open_split_tokens
from gpt2lab.data.prepare import PrepareOptions, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import get_tokenizer


def epoch_windows(data_dir, world_size, **kw):
    """Per rank, the first x position of every row over one epoch, checking x/y on the way."""
    loaders = [ShardLoader(data_dir, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    steps = loaders[0].steps_per_epoch
    starts = {r: [] for r in range(world_size)}
    for _ in range(steps):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            assert x.dtype == y.dtype == torch.int64
            assert x.shape == y.shape == (kw["batch_size"], kw["seq_len"])
            assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
            if not kw["shuffle"]:  # in shard order, rows are runs of consecutive positions, across boundaries too
                assert torch.equal(x[:, 1:], x[:, :-1] + 1) and torch.equal(y, x + 1)
            starts[r] += x[:, 0].tolist()
        assert all(loader.epoch == 0 for loader in loaders)
    return starts, steps


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_position_once_per_epoch_and_ranks_disjoint(positions_dir, world_size):
    B, T = 4, 16
    starts, steps = epoch_windows(positions_dir, world_size, batch_size=B, seq_len=T, seed=0, shuffle=False)
    total = 1000 + 1537 + 3 + 700  # positions_dir's train shards
    assert steps == ((total - 1) // T) // (B * world_size)
    all_starts = sorted(s for r in starts for s in starts[r])
    assert all_starts == list(range(0, steps * B * world_size * T, T))  # each window once, none skipped
    covered = np.concatenate([np.arange(s, s + T) for s in all_starts])
    assert len(np.unique(covered)) == len(covered) == steps * B * world_size * T  # every position once
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(starts[a]) & set(starts[b])
    # Windows that straddle shard boundaries (1000, 2537, 2540) are served whole.
    assert any(s < 1000 < s + T for s in all_starts) and any(s < 2537 < s + T for s in all_starts)


def test_shuffled_epochs_are_seeded_disjoint_and_cover_distinct_windows(positions_dir):
    B, T = 2, 8
    kw = {"batch_size": B, "seq_len": T, "seed": 7, "shuffle": True}
    starts, steps = epoch_windows(positions_dir, 2, **kw)
    # A window's first token (its position in the split) identifies it: ranks share none, none repeats.
    assert not set(starts[0]) & set(starts[1])
    everything = starts[0] + starts[1]
    assert len(set(everything)) == len(everything) == steps * B * 2
    assert everything != sorted(everything)  # actually shuffled

    def first_epochs(seed):
        loader = ShardLoader(positions_dir, batch_size=B, seq_len=T, seed=seed, shuffle=True)
        return [loader.next_batch()[0][:, 0].tolist() for _ in range(2 * loader.steps_per_epoch + 3)]

    assert first_epochs(7) == first_epochs(7)
    assert first_epochs(7) != first_epochs(8)
    loader = ShardLoader(positions_dir, batch_size=B, seq_len=T, seed=7, shuffle=True, block_windows=5)
    for _ in range(3 * loader.steps_per_epoch):
        loader.next_batch()
    assert loader.epoch >= 2


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(positions_dir, shuffle, world_size):
    kw = {"batch_size": 3, "seq_len": 32, "world_size": world_size, "seed": 3, "shuffle": shuffle}
    for rank in range(world_size):
        reference = ShardLoader(positions_dir, rank=rank, block_windows=10, **kw)
        steps = reference.steps_per_epoch
        expected = [reference.next_batch() for _ in range(3 * steps + 2)]  # crosses two epoch ends
        for cut in (1, steps - 1, steps, steps + 1, 2 * steps + 3):
            first = ShardLoader(positions_dir, rank=rank, block_windows=10, **kw)
            for _ in range(cut):
                first.next_batch()
            state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
            resumed = ShardLoader(positions_dir, rank=rank, block_windows=10, **kw)
            resumed.load_state_dict(state)
            for x_exp, y_exp in expected[cut : cut + steps + 2]:
                x, y = resumed.next_batch()
                assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_state_from_other_settings_is_refused(positions_dir):
    loader = ShardLoader(positions_dir, batch_size=2, seq_len=16)
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["cursor"] == 0 and state["split"] == "train"
    other = ShardLoader(positions_dir, batch_size=2, seq_len=8)
    with pytest.raises(GPT2LabError, match="seq_len=16, but this loader has 8"):
        other.load_state_dict(state)
    val = ShardLoader(positions_dir, "val", batch_size=2, seq_len=16)
    with pytest.raises(GPT2LabError, match="split='train'"):
        val.load_state_dict(state)


def test_bad_arguments_and_too_small_splits(positions_dir):
    with pytest.raises(GPT2LabError, match="too few for one batch"):
        ShardLoader(positions_dir, "val", batch_size=8, seq_len=64, world_size=1)
    with pytest.raises(GPT2LabError, match="rank must be in"):
        ShardLoader(positions_dir, rank=2, world_size=2)
    with pytest.raises(GPT2LabError, match="batch_size must be at least 1"):
        ShardLoader(positions_dir, batch_size=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [(lambda b: b[:-1], "truncated"), (lambda b: b"\x00\x00\x00\x00" + b[4:], "not a token shard")],
)
def test_damaged_shard_is_named_on_open(positions_dir, damage, message):
    path = positions_dir / "pos_train_000003.bin"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(GPT2LabError, match=message) as e:
        ShardLoader(positions_dir, batch_size=2, seq_len=16)
    assert str(path) in str(e.value)


def test_loader_and_val_tokens_on_prepared_shakespeare(tmp_path, shakespeare_path):
    tok = get_tokenizer()
    prepare(PrepareOptions(str(shakespeare_path), tmp_path, shard_tokens=100_000, workers=1, progress=False))
    val = open_split_tokens(tmp_path, "val", tokenizer=tok)
    reference = [tok.eot_token, *tok.encode_ordinary(shakespeare_path.read_text(encoding="utf-8"))]
    assert len(val) == 33_802
    np.testing.assert_array_equal(val[0 : len(val)], reference[:33_802])
    loader = ShardLoader(tmp_path, "train", batch_size=4, seq_len=64, tokenizer=tok)
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x[0].numpy(), reference[33_802 : 33_802 + 64])
    np.testing.assert_array_equal(y[0].numpy(), reference[33_803 : 33_802 + 65])

    class OtherTokenizer:
        name, vocab_hash = "other", "0" * 64

    with pytest.raises(GPT2LabError, match="tokenized with 'gpt2'"):
        ShardLoader(tmp_path, "train", batch_size=4, seq_len=64, tokenizer=OtherTokenizer())
