"""The training benchmarks run (not how fast): extras, left out of the default suite (pytest -m slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.slow
def test_train_cpu_bench_prints_a_ratio():
    cmd = [sys.executable, str(BENCH / "train_cpu.py"), "--rounds", "1", "--steps", "1", "--threads", "1"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio gpt2lab / transformers" in result.stdout


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_with_a_toy_model(tmp_path):
    env = {**subprocess_env(), "DEVICE": "cpu", "TINY": "--tiny", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio gpt2lab" in result.stdout and ": OK" in result.stdout
    assert (tmp_path / "curve" / "curve.png").is_file()
