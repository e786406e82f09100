"""Precision chosen by the device's capability, and the CPU bf16 probe with its override."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.errors import GPT2LabError
from gpt2lab.runtime import autocast, autocast_dtype, cpu_has_fast_bf16, needs_grad_scaler

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is a given card (only its capability and name are asked)."""

    def install(capability: tuple[int, int], name: str = "Tesla T4") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


@pytest.mark.parametrize(
    "capability,expected",
    [
        ((6, 1), None),  # Pascal: no tensor cores, fp16 at 1/64 rate
        ((7, 0), torch.float16),  # V100
        ((7, 5), torch.float16),  # T4
        ((8, 0), torch.bfloat16),  # A100
        ((8, 9), torch.bfloat16),  # L4, RTX 4090
        ((9, 0), torch.bfloat16),  # H100, H200
    ],
)
def test_auto_precision_follows_the_gpu_capability(gpu, capability, expected):
    gpu(capability)
    assert autocast_dtype("auto", CUDA) == expected
    assert needs_grad_scaler(autocast_dtype("auto", CUDA)) == (expected == torch.float16)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_explicit_bf16_on_a_gpu_without_bf16_tensor_cores_is_an_error(gpu, capability):
    gpu(capability, "Tesla V100-SXM2-16GB")
    major, minor = capability
    message = (
        f"train.precision = bf16: Tesla V100-SXM2-16GB \\(compute capability {major}.{minor}\\) has no bfloat16 "
        "tensor cores \\(they start at 8.0\\); use --set train.precision=fp16, or auto"
    )
    with pytest.raises(GPT2LabError, match=message):
        autocast_dtype("bf16", CUDA)
    assert autocast_dtype("fp16", CUDA) == torch.float16


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_explicit_precisions_on_a_gpu_with_bf16(gpu, capability):
    gpu(capability)
    assert autocast_dtype("bf16", CUDA) == torch.bfloat16
    assert autocast_dtype("fp16", CUDA) == torch.float16
    assert autocast_dtype("fp32", CUDA) is None


def test_explicit_precisions_on_cpu_and_mps():
    for device in (CPU, torch.device("mps")):
        assert autocast_dtype("bf16", device) == torch.bfloat16
        assert autocast_dtype("fp16", device) == torch.float16
        assert autocast_dtype("fp32", device) is None
    assert autocast_dtype("auto", torch.device("mps")) is None
    assert not needs_grad_scaler(torch.bfloat16) and not needs_grad_scaler(None)


def test_cpu_bf16_environment_variable_overrides_the_probe(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setenv("GPT2LAB_CPU_BF16", "0")
    assert cpu_has_fast_bf16() is False
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setenv("GPT2LAB_CPU_BF16", "1")
    assert cpu_has_fast_bf16() is True
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setenv("GPT2LAB_CPU_BF16", "yes")
    with pytest.raises(GPT2LabError, match="GPT2LAB_CPU_BF16 must be 0 or 1 \\(or unset to ask the CPU\\), got 'yes'"):
        cpu_has_fast_bf16()


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_probe_without_the_variable(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.delenv("GPT2LAB_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has_fast_bf16() is expected
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if expected else None)
    monkeypatch.setenv("GPT2LAB_CPU_BF16", "")  # empty counts as unset
    assert cpu_has_fast_bf16() is expected


def test_autocast_is_a_no_op_without_a_dtype():
    a, b = torch.ones(4, 4), torch.ones(4, 4)
    with autocast(CPU, None):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


# ------------------------------------------------------------------ keeping freed memory (glibc malloc)

FAULTS_SCRIPT = """
import resource, sys, torch
from gpt2lab.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] in ("keep", "undo") else False

def faults():  # page faults of allocating, writing and freeing a 64 MB tensor 5 times
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

for _ in range(3):  # the heap settles in the first rounds
    faults()
if sys.argv[1] == "undo":
    kept = not keep_freed_memory(False)
print(kept, faults())
"""
PAGES_64MB = 64 * 2**20 // 4096


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in_again():
    from gpt2lab.runtime import _glibc

    if _glibc() is None:
        pytest.skip("the C library is not glibc: keep_freed_memory does nothing")
    kept, faults = _faults("keep", {"GPT2LAB_KEEP_FREED_MEMORY": ""})
    assert kept and faults < PAGES_64MB // 4  # the 64 MB come from memory already mapped
    plain_kept, plain = _faults("default")
    assert not plain_kept and plain >= 4 * PAGES_64MB  # glibc's default: an mmap, faulted in, each time
    off_kept, off = _faults("keep", {"GPT2LAB_KEEP_FREED_MEMORY": "0"})
    assert not off_kept and off >= 4 * PAGES_64MB  # the variable turns it off


def test_keep_freed_memory_can_be_undone():
    from gpt2lab.runtime import _glibc

    if _glibc() is None:
        pytest.skip("the C library is not glibc: keep_freed_memory does nothing")
    kept, faults = _faults("undo", {"GPT2LAB_KEEP_FREED_MEMORY": ""})
    # The kept memory went back to the OS (malloc_trim), so the block is faulted in again: at least once,
    # and on every allocation where it is mmapped as by default. A free block that malloc_trim left in
    # the middle of the heap (its pages returned) can serve the next allocations, so not always 5 times.
    assert not kept and faults >= PAGES_64MB
