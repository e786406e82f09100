"""What the benchmarks print about the machine they ran on: the CPU's name, and the features that decide
its matmul speed (the vector ISA torch dispatches to, and whether gpt2lab finds bf16 instructions)."""

from __future__ import annotations

from gpt2lab.runtime import cpu_name  # noqa: F401 - the benchmarks import it from here


def cpu_features() -> str:
    import torch

    from gpt2lab.runtime import cpu_has_fast_bf16

    isa = torch.backends.cpu.get_cpu_capability()
    return f"kernels {isa}, bf16 instructions {'yes' if cpu_has_fast_bf16() else 'no'}"
