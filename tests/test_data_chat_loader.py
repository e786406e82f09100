"""The chat loader: rows from conversation starts, best-fit packing, -1 targets where the mask is 0 and on
padding, rank-disjoint, shuffled by seed, resumable; on in-memory conversations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gpt2lab.data.chat_loader import ChatLoader, conversation_starts, pack_best_fit
from gpt2lab.data.shards import TokenSequence
from gpt2lab.errors import GPT2LabError

BOS = 0


def conversations(lengths: list[int], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Conversations of the given lengths: BOS then tokens 1..999; mask 1 on the second half of each."""
    rng = np.random.default_rng(seed)
    toks, masks = [], []
    for n in lengths:
        toks.append(np.concatenate([[BOS], rng.integers(1, 1000, n - 1)]).astype(np.uint16))
        masks.append((np.arange(n) >= n // 2).astype(np.uint8))
    return toks, masks


def loader_of(lengths: list[int], shards: int = 2, **kwargs) -> tuple[ChatLoader, list[np.ndarray], list[np.ndarray]]:
    """A ChatLoader over conversations of `lengths` split into `shards` shards (cut mid-conversation)."""
    toks, masks = conversations(lengths)
    flat_t, flat_m = np.concatenate(toks), np.concatenate(masks)
    cuts = np.linspace(0, len(flat_t), shards + 1).astype(int)
    seq = TokenSequence([flat_t[a:b] for a, b in itertools.pairwise(cuts)], [f"s{i}" for i in range(shards)])
    mseq = TokenSequence([flat_m[a:b] for a, b in itertools.pairwise(cuts)])
    return ChatLoader(seq, mseq, BOS, **kwargs), toks, masks


def test_best_fit_takes_the_longest_that_fits_then_pads():
    assert pack_best_fit(np.array([5, 3, 8, 2]), 10) == [[2, 3], [0, 1]]
    # The earliest of equal lengths first; a buffer of 2 only sees the next two conversations.
    assert pack_best_fit(np.array([4, 4, 4]), 10) == [[0, 1], [2]]
    assert pack_best_fit(np.array([9, 1, 9, 1]), 10, buffer=2) == [[0, 1], [2, 3]]
    assert pack_best_fit(np.array([2, 9, 9, 1]), 10, buffer=1) == [[0], [1], [2, 3]]


def test_conversation_starts_span_shards_and_count_a_headless_start():
    seq = TokenSequence([np.array([BOS, 5, 6, BOS], np.uint16), np.array([7, BOS, 8], np.uint16)])
    assert conversation_starts(seq, BOS).tolist() == [0, 3, 5]
    headless = TokenSequence([np.array([4, BOS, 5], np.uint16)])
    assert conversation_starts(headless, BOS).tolist() == [0, 1]


def test_rows_start_at_conversations_cut_long_ones_and_mask_targets():
    # seq_len 9: rows of 10 tokens. Conversations of 6, 14 (cut to 10) and 4 tokens.
    loader, toks, masks = loader_of([6, 14, 4], batch_size=1, seq_len=9)
    assert [r.tolist() for r in loader._rows] == [[1], [0, 2]]
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, 9)
    long = toks[1][:10].astype(np.int64)
    assert x[0].tolist() == long[:9].tolist()
    assert y[0].tolist() == [t if m else -1 for t, m in zip(long[1:], masks[1][1:10])]
    x, y = loader.next_batch()
    row = np.concatenate([toks[0], toks[2]]).astype(np.int64)  # 10 tokens exactly: no padding
    learn = np.concatenate([masks[0], masks[2]])
    assert x[0].tolist() == row[:9].tolist()
    assert y[0].tolist() == [t if m else -1 for t, m in zip(row[1:], learn[1:])]
    assert y[0, 5] == -1  # predicting the second conversation's BOS is never learned


def test_padding_is_bos_in_and_ignored_out():
    loader, toks, masks = loader_of([3, 12], batch_size=2, seq_len=7)
    x, y = loader.next_batch()
    # Row 0: the 12-token conversation cut to 8; row 1: the 3-token one, then 5 padding positions.
    assert x[1].tolist() == [*toks[0].tolist(), BOS, BOS, BOS, BOS, BOS][:7]
    assert y[1].tolist() == [toks[0][1] if masks[0][1] else -1, toks[0][2] if masks[0][2] else -1, *[-1] * 5]


def test_ranks_take_disjoint_rows_of_the_same_step():
    lengths = list(np.random.default_rng(1).integers(3, 30, 60))
    whole, _, _ = loader_of(lengths, batch_size=4, seq_len=16, seed=3, shuffle=True)
    ranks = [
        loader_of(lengths, batch_size=2, seq_len=16, seed=3, shuffle=True, rank=r, world_size=2)[0] for r in (0, 1)
    ]
    for _ in range(whole.steps_per_epoch + 2):  # into the second epoch
        x, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_an_epoch_holds_every_conversation_once_in_an_order_drawn_from_the_seed():
    lengths = list(np.random.default_rng(2).integers(3, 12, 40))
    a, _, _ = loader_of(lengths, batch_size=1, seq_len=15, seed=7, shuffle=True)
    b, _, _ = loader_of(lengths, batch_size=1, seq_len=15, seed=8, shuffle=True)
    for loader in (a, b):
        assert sorted(int(c) for row in loader._rows for c in row) == list(range(40))
    first = [r.tolist() for r in a._rows]
    assert first != [r.tolist() for r in b._rows]
    assert first == [r.tolist() for r in loader_of(lengths, batch_size=1, seq_len=15, seed=7, shuffle=True)[0]._rows]
    a.cursor = a.rows_in_epoch
    a.next_batch()  # the next epoch: another order
    assert a.epoch == 1 and [r.tolist() for r in a._rows] != first


def test_state_dict_resumes_exactly_across_epochs():
    lengths = list(np.random.default_rng(3).integers(3, 40, 50))
    kw = dict(batch_size=3, seq_len=24, seed=5, shuffle=True)
    straight, _, _ = loader_of(lengths, **kw)
    expected = [straight.next_batch() for _ in range(2 * straight.steps_per_epoch + 1)]
    first, _, _ = loader_of(lengths, **kw)
    for _ in range(straight.steps_per_epoch + 1):
        first.next_batch()
    state = first.state_dict()
    resumed, _, _ = loader_of(lengths, **kw)
    resumed.load_state_dict(state)
    for want in expected[straight.steps_per_epoch + 1 :]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_state_of_other_settings_or_text_training_is_refused():
    lengths = [5, 9, 7, 6, 8]
    loader, _, _ = loader_of(lengths, batch_size=1, seq_len=10, seed=1)
    other, _, _ = loader_of(lengths, batch_size=1, seq_len=12, seed=1)
    with pytest.raises(
        GPT2LabError, match=r"^the saved data loader position is for seq_len=12, but this loader has 10"
    ):
        loader.load_state_dict(other.state_dict())
    with pytest.raises(GPT2LabError, match=r"is that of text training \(train.loss = 'all'\)"):
        loader.load_state_dict({"version": 1, "epoch": 0, "cursor": 0, "split": "train"})


def test_too_little_data_and_mismatched_masks_are_clear_errors():
    with pytest.raises(GPT2LabError, match=r"has 2 conversations, which pack into 1 rows of 17 tokens: too few"):
        loader_of([5, 6], batch_size=2, seq_len=16)
    seq = TokenSequence([np.array([BOS, 1, 2], np.uint16)])
    with pytest.raises(GPT2LabError, match=r"has 3 tokens but 2 loss mask values; prepare the data again"):
        ChatLoader(seq, TokenSequence([np.array([0, 1], np.uint8)]), BOS, batch_size=1, seq_len=2)
