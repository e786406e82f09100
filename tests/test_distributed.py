"""distributed.setup on GPUs, without GPUs: CUDA and the process group are replaced by recorders."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gpt2lab import distributed
from gpt2lab.errors import GPT2LabError


@pytest.fixture
def fake_gpus(monkeypatch):
    """A node with `n` GPUs under torchrun; returns what init_process_group and set_device were given."""
    seen: dict = {"init": [], "set_device": []}

    def install(n: int, rank: int, local_rank: int, world: int) -> dict:
        for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world)):
            monkeypatch.setenv(key, str(value))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen["set_device"].append(device))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen["init"].append(kwargs))
        return seen

    return install


def test_nccl_rank_takes_its_local_gpu_and_binds_the_group_to_it(fake_gpus):
    seen = fake_gpus(n=8, rank=11, local_rank=3, world=16)
    env = distributed.setup("auto", timeout_minutes=7)
    assert (env.rank, env.local_rank, env.world_size) == (11, 3, 16)
    assert env.device == torch.device("cuda", 3) and not env.is_main
    assert seen["set_device"] == [torch.device("cuda", 3)]
    [kwargs] = seen["init"]
    assert kwargs["backend"] == "nccl"
    # device_id binds the communicator to this GPU at once (eager NCCL init, no guessing in barrier())
    assert kwargs["device_id"] == torch.device("cuda", 3)
    assert kwargs["timeout"].total_seconds() == 7 * 60


def test_explicit_cuda_device_under_torchrun_uses_the_local_rank(fake_gpus):
    seen = fake_gpus(n=2, rank=1, local_rank=1, world=2)
    assert distributed.setup("cuda").device == torch.device("cuda", 1)
    assert seen["init"][0]["device_id"] == torch.device("cuda", 1)


def test_more_ranks_than_gpus_is_one_clear_error(fake_gpus):
    seen = fake_gpus(n=2, rank=2, local_rank=2, world=4)
    with pytest.raises(
        GPT2LabError,
        match=r"local rank 2 has no GPU \(this node has 2\); use torchrun --nproc_per_node at most the number of GPUs",
    ):
        distributed.setup("auto")
    assert seen["init"] == [] and seen["set_device"] == []  # nothing was joined


def test_cpu_ranks_use_gloo_without_a_device_id(fake_gpus):
    seen = fake_gpus(n=0, rank=0, local_rank=0, world=2)
    env = distributed.setup("cpu")
    assert env.device == torch.device("cpu") and env.is_main
    [kwargs] = seen["init"]
    assert kwargs["backend"] == "gloo" and "device_id" not in kwargs
    assert seen["set_device"] == []


def test_without_torchrun_nothing_is_joined(fake_gpus, monkeypatch):
    seen = fake_gpus(n=1, rank=0, local_rank=0, world=1)
    monkeypatch.delenv("RANK")
    env = distributed.setup("auto")
    assert env.device == torch.device("cuda") and env.world_size == 1
    assert seen["init"] == [] and seen["set_device"] == []
