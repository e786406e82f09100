"""PrefetchLoader: the ShardLoader's batches and positions, read ahead by a thread that always stops."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from gpt2lab.data import ShardLoader
from gpt2lab.data.prefetch import PrefetchLoader
from gpt2lab.errors import GPT2LabError


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpt2lab-prefetch"]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    assert prefetch_threads() == []


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_same_bytes_and_states_as_the_plain_loader_across_epoch_ends(positions_dir, shuffle, world_size):
    kw = {"batch_size": 3, "seq_len": 32, "world_size": world_size, "seed": 5, "shuffle": shuffle, "block_windows": 7}
    for rank in range(world_size):
        plain = ShardLoader(positions_dir, rank=rank, **kw)
        steps = plain.steps_per_epoch
        with PrefetchLoader(ShardLoader(positions_dir, rank=rank, **kw), depth=3) as ahead:
            assert ahead.state_dict() == plain.state_dict()
            for _ in range(2 * steps + 3):  # crosses two epoch ends
                x, y = ahead.next_batch()
                x_exp, y_exp = plain.next_batch()
                assert x.dtype == torch.int64 and x.shape == (3, 32)
                assert x.numpy().tobytes() == x_exp.numpy().tobytes()
                assert y.numpy().tobytes() == y_exp.numpy().tobytes()
                # the position of the batch just handed out, though the thread has read further
                assert ahead.state_dict() == plain.state_dict()
            assert ahead.epoch == plain.epoch == 2
            deadline = time.monotonic() + 10
            while (ahead.loader.epoch, ahead.loader.cursor) == (ahead.epoch, ahead.cursor):  # until it reads ahead
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert ahead.state_dict() == plain.state_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_from_a_prefetching_state_is_exact(positions_dir, shuffle):
    kw = {"batch_size": 4, "seq_len": 16, "seed": 2, "shuffle": shuffle, "block_windows": 10}
    reference = ShardLoader(positions_dir, **kw)
    steps = reference.steps_per_epoch
    expected = [reference.next_batch() for _ in range(2 * steps + 2)]
    for cut in (0, 1, steps - 1, steps, steps + 1):
        with PrefetchLoader(ShardLoader(positions_dir, **kw), depth=2) as first:
            for _ in range(cut):
                first.next_batch()
            state = json.loads(json.dumps(first.state_dict()))
        for resumed in (ShardLoader(positions_dir, **kw), PrefetchLoader(ShardLoader(positions_dir, **kw))):
            resumed.load_state_dict(state)
            for x_exp, y_exp in expected[cut : cut + steps + 1]:
                x, y = resumed.next_batch()
                assert torch.equal(x, x_exp) and torch.equal(y, y_exp)
            if isinstance(resumed, PrefetchLoader):
                resumed.close()


def test_close_rewinds_to_the_batches_handed_out(positions_dir):
    kw = {"batch_size": 2, "seq_len": 16, "seed": 1, "shuffle": True}
    expected = ShardLoader(positions_dir, **kw)
    ahead = PrefetchLoader(ShardLoader(positions_dir, **kw), depth=4)
    for _round in range(3):
        for _ in range(5):
            assert torch.equal(ahead.next_batch()[0], expected.next_batch()[0])
        time.sleep(0.05)  # let the thread fill its queue and block on it
        ahead.close()
        assert prefetch_threads() == []
        assert ahead.loader.state_dict() == expected.state_dict()  # the inner loader is back where we are
    ahead.close()  # twice is fine


def test_a_read_error_reaches_the_caller_and_stops_the_thread(positions_dir, monkeypatch):
    inner = ShardLoader(positions_dir, batch_size=2, seq_len=16)
    real = inner.next_batch
    calls = {"n": 0}

    def failing_third_read():
        calls["n"] += 1
        if calls["n"] == 3:
            raise GPT2LabError("shard pos_train_000002.bin is damaged")
        return real()

    monkeypatch.setattr(inner, "next_batch", failing_third_read)
    ahead = PrefetchLoader(inner, depth=2)
    first, second = ahead.next_batch(), ahead.next_batch()
    assert first[0][0, 0].item() == 0 and second[0][0, 0].item() == 32
    with pytest.raises(GPT2LabError, match="pos_train_000002.bin is damaged"):
        ahead.next_batch()
    assert prefetch_threads() == []
    assert ahead.state_dict()["cursor"] == 4  # two batches of two windows were handed out


def test_an_exception_in_the_consumer_with_a_context_manager_stops_the_thread(positions_dir):
    loader = ShardLoader(positions_dir, batch_size=2, seq_len=16)
    with pytest.raises(KeyError, match="boom"), PrefetchLoader(loader, depth=1) as ahead:
        ahead.next_batch()
        time.sleep(0.05)  # the thread is now blocked on a full queue
        raise KeyError("boom")


def test_bad_depth_is_refused(positions_dir):
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        PrefetchLoader(ShardLoader(positions_dir, batch_size=2, seq_len=16), depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_for_cuda(positions_dir):
    with PrefetchLoader(ShardLoader(positions_dir, batch_size=2, seq_len=16), pin_memory=True) as ahead:
        x, y = ahead.next_batch()
        assert x.is_pinned() and y.is_pinned()
        x_gpu = x.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(x_gpu.cpu(), ShardLoader(positions_dir, batch_size=2, seq_len=16).next_batch()[0])
