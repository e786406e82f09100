"""What the benchmarks print about the machine they ran on: the CPU's name, and the features that decide
its matmul speed (the vector ISA torch dispatches to, and whether gpt2lab finds bf16 instructions)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    import torch

    from gpt2lab.runtime import cpu_has_fast_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    return f"kernels {isa}, bf16 instructions {'yes' if cpu_has_fast_bf16() else 'no'}"
