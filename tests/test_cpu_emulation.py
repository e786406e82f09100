"""`make test-avx2`: its variables make any x86-64 machine run PyTorch and oneDNN as an AVX2-only CPU.

The environment is read from the Makefile itself, so the test checks what the target really sets.
Only what an AVX-512 machine shows just as well under these variables is asserted: PyTorch's kernel
choice (ATEN_CPU_CAPABILITY is taken as given wherever the CPU has AVX2) and oneDNN's ISA cap.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

X86_64 = platform.machine().lower() in ("x86_64", "amd64")

PROBE = """
import torch
print("capability", torch.backends.cpu.get_cpu_capability())
if torch.backends.mkldnn.is_available():
    # A packed linear, as CPU inference runs it: oneDNN prints its ISA when it first starts.
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 32), 4)
    torch.ops.mkldnn._linear_pointwise(torch.randn(4, 32), packed, None, "none", [], "")
"""


def makefile_avx2_env() -> dict[str, str]:
    m = re.search(r"^AVX2_ENV := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile defines no AVX2_ENV"
    return dict(item.split("=", 1) for item in m.group(1).split())


def test_the_makefile_sets_the_documented_variables():
    assert makefile_avx2_env() == {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "GPT2LAB_CPU_BF16": "0",
    }


@pytest.mark.skipif(not X86_64, reason="AVX2 is an x86-64 instruction set")
@pytest.mark.subprocess
def test_torch_and_onednn_run_as_an_avx2_cpu():
    env = {**subprocess_env(), **makefile_avx2_env(), "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "capability AVX2\n" in proc.stdout
    import torch

    if torch.backends.mkldnn.is_available():
        isa = re.findall(r"^(?:onednn|dnnl)_verbose,.*info,cpu,isa:(.*)$", proc.stdout, re.M)
        assert len(isa) == 1, proc.stdout
        assert "AVX2" in isa[0] and "AVX-512" not in isa[0] and "AMX" not in isa[0]
