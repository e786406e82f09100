"""The training benchmarks run (not how fast): extras, left out of the default suite (pytest -m slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_train_cpu_bench_prints_a_ratio():
    cmd = [sys.executable, str(BENCH / "train_cpu.py"), "--rounds", "1", "--steps", "1", "--threads", "1"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio gpt2lab / plain" in result.stdout and "ratio gpt2lab / transformers" in result.stdout
    assert "of GEMM" in result.stdout
