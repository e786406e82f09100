"""Device, dtype and seeding helpers shared by the CLI commands and the library."""

from __future__ import annotations

import base64
import os
import random
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


def cache_dir() -> Path:
    """gpt2lab's download cache: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab."""
    env = os.environ.get("GPT2LAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gpt2lab"


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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), making bf16 autocast
    about twice as fast as float32 for training matmuls; elsewhere it is slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto | bf16 | fp32) on `device`; None means plain float32.

    auto: bf16 on CUDA GPUs that support it, and on CPUs with bf16 instructions; fp32 elsewhere
    (MPS, older GPUs, older CPUs). Weights, gradients and optimizer state stay float32 either way.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise GPT2LabError("this GPU does not support bfloat16; use --set train.precision=fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None
