"""Device, dtype and seeding helpers shared by the CLI commands and the library."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GPT2LabError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not available is an error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GPT2LabError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPT2LabError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise GPT2LabError(f"device {name!r} requested but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise GPT2LabError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16") from None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step draws from (python, numpy, torch CPU, CUDA, MPS), as
    JSON-ready values, so that a resumed run draws exactly what an uninterrupted one would."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[v.item() if hasattr(v, "item") else v for v in np_state[2:]]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if _mps_available():
        state["mps"] = _b64(torch.mps.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only where this machine has as many GPUs)."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_unb64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    if state.get("mps") and _mps_available():
        torch.mps.set_rng_state(_unb64(state["mps"]))


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


CPU_BF16_ENV = "GPT2LAB_CPU_BF16"


@functools.cache
def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else what `platform` knows); read once."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


KEEP_FREED_MEMORY_ENV = "GPT2LAB_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h) and its defaults, which keep_freed_memory(False) restores.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEPT_TRIM_THRESHOLD = 2**30  # freed memory at the heap's top stays mapped up to 1 GiB


@functools.cache
def _glibc() -> Any:
    """glibc's mallopt and malloc_trim, or None where the C library is another (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return mallopt, trim


def keep_freed_memory(on: bool = True) -> bool:
    """Keep freed memory in the process for the next allocation instead of handing it back to the OS.

    glibc's malloc serves every block over 32 MB (by default smaller ones too) with a fresh mmap and
    unmaps it when freed, so a training step that allocates its large tensors anew takes a page fault,
    and a zeroed page, on every 4 KB of them (the cost: docs/performance.md, "Training a small model on
    a CPU"). With `on`, malloc maps nothing and keeps up to 1 GiB free at the heap's top for the next
    step; with `on` False, glibc's defaults come back and the kept memory is returned. Process-wide (the
    trainer calls it on CPU); does nothing without glibc or with GPT2LAB_KEEP_FREED_MEMORY=0. Returns
    whether malloc is now set as asked.
    """
    if on and os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip() == "0":
        return False
    glibc = _glibc()
    if glibc is None:
        return False
    mallopt, malloc_trim = glibc
    mmap_max, threshold = (0, KEPT_TRIM_THRESHOLD) if on else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    done = bool(mallopt(_M_MMAP_MAX, mmap_max)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    if not on:
        malloc_trim(0)  # what was kept goes back to the OS, so that large blocks are mmapped again
    return done


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): there bf16 autocast makes
    training matmuls faster than float32, elsewhere slower (docs/cpu.md, "What gpt2lab decides by itself").

    The environment variable GPT2LAB_CPU_BF16 overrides the probe: "0" answers no (to behave as on a
    CPU without bf16 instructions, e.g. when testing under ATEN_CPU_CAPABILITY=avx2), "1" answers yes;
    unset or empty, the CPU is asked.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise GPT2LabError(f"{CPU_BF16_ENV} must be 0 or 1 (or unset to ask the CPU), got {forced!r}")
        return forced == "1"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


# bf16 tensor cores start with Ampere (compute capability 8.0); Volta (7.0) and Turing (7.5) have
# fp16 tensor cores only and emulate bf16 slowly, which torch.cuda.is_bf16_supported() counts as
# support by default. Below 7.0 there are no tensor cores, and most Pascal cards run fp16 at 1/64
# of the float32 rate (NVIDIA Pascal tuning guide), so float32 is the fast choice there.
BF16_MIN_CAPABILITY = (8, 0)
FP16_MIN_CAPABILITY = (7, 0)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto | bf16 | fp16 | fp32) on `device`; None means plain float32.

    auto: bf16 on CUDA GPUs of compute capability >= 8.0 (A100, H100, L4, RTX 30xx ...); float16 on
    7.x (V100, T4, RTX 20xx), which needs a loss scaler (see `needs_grad_scaler`); bf16 on CPUs with
    bf16 instructions (see `cpu_has_fast_bf16`); float32 elsewhere (older GPUs and CPUs, MPS).
    bf16 on a CUDA GPU below capability 8.0 is an error. Weights, gradients and optimizer state stay
    float32 either way.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and cuda_capability(device) < BF16_MIN_CAPABILITY:
            major, minor = cuda_capability(device)
            raise GPT2LabError(
                f"train.precision = bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                "has no bfloat16 tensor cores (they start at 8.0); use --set train.precision=fp16, or auto"
            )
        return torch.bfloat16
    if device.type == "cuda":
        capability = cuda_capability(device)
        if capability >= BF16_MIN_CAPABILITY:
            return torch.bfloat16
        return torch.float16 if capability >= FP16_MIN_CAPABILITY else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`, or a no-op when `dtype` is None (plain float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """float16 gradients underflow without loss scaling (Micikevicius et al. 2018, "Mixed precision
    training"); bfloat16 has float32's exponent range and needs none."""
    return dtype == torch.float16


# cuBLAS is repeatable only with one of these workspace settings (cuBLAS documentation, "Results
# reproducibility"); PyTorch's use_deterministic_algorithms refuses cuBLAS calls without one.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def deterministic_cublas() -> bool:
    """Set CUBLAS_WORKSPACE_CONFIG=:4096:8 unless a deterministic setting is already there. PyTorch sizes
    cuBLAS's workspace from it once, at the process's first cuBLAS call, so this must come before CUDA
    starts; returns False when it came too late (CUDA already started without the setting)."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in DETERMINISTIC_CUBLAS:
        return True
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    return not torch.cuda.is_initialized()


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Repeatable kernels inside the block, the previous settings back after it.

    torch.use_deterministic_algorithms(True) (any op without a deterministic version is an error),
    cuDNN's deterministic algorithms without autotuning, and on CUDA attention on SDPA's math backend:
    the backward passes of flash and memory-efficient attention add up partial sums in whatever order
    the thread blocks finish. CUBLAS_WORKSPACE_CONFIG must already be set (`deterministic_cublas`).
    On CPU the kernels gpt2lab trains with are already repeatable, and nothing observable changes.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
