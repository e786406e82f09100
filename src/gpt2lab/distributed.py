"""Running under `torchrun`: process group set-up, the rank's device, and the few collectives that
training and evaluation need.

torchrun (torch.distributed.run) starts one process per device and tells each its place through the
environment: RANK (global), LOCAL_RANK (on this node), WORLD_SIZE. Without those variables the run is
a single process and every helper here is a no-op. GPUs talk over NCCL, CPUs over gloo. Multi-node
runs need nothing more than torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint); see README.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .download import cached_download
from .errors import GPT2LabError
from .runtime import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def setup(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group when launched by torchrun and pick this rank's device.

    With CUDA, rank r on a node takes GPU LOCAL_RANK. The timeout bounds how long a rank waits for the
    others in a collective (a checkpoint written by rank 0 makes the others wait at the next one).
    """
    chosen = resolve_device(device)
    if not launched_by_torchrun():
        return DistEnv(device=chosen)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if chosen.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GPT2LabError(
                f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                "use torchrun --nproc_per_node at most the number of GPUs"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    elif chosen.type == "mps":
        raise GPT2LabError("multi-process training on MPS is not supported; run a single process")
    else:
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist.is_initialized():  # joined already (a library caller, then the CLI in the same process)
        pass
    elif backend == "nccl":
        dist.init_process_group(backend=backend, timeout=timeout, device_id=chosen)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=chosen)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op in a single process) and return it.

    NCCL reduces CUDA tensors only: a CPU tensor makes a round trip through this rank's GPU."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            buf = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            tensor.copy_(buf)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's `obj` (JSON-like), in rank order, on rank 0; None on the other ranks."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def download_once(url: str, name: str, rank: int) -> Path:
    """`cached_download(url, name)` on rank 0 while the other ranks wait, then on them: it is fetched once
    per job, and the others find it in the cache."""
    path = cached_download(url, name) if rank == 0 else None
    barrier()
    return path if path is not None else cached_download(url, name)
