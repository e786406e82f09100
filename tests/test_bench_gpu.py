"""bench/gpu.sh, rehearsed on the CPU before it ever meets a GPU: both parts run and pass their checks with
toy models (REHEARSE=1), a part that fails makes the script fail, and bench/pydeps.py unpacks a missing
package from a local wheel without pip or a network."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "bench" / "gpu.sh"


def run_gpu_sh(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "REHEARSE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        ["bash", str(GPU_SH), *args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_the_whole_script_rehearses_on_the_cpu(tmp_path):
    result = run_gpu_sh("--out", str(tmp_path))
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    # speed: both models, compiled, the same first-step loss to float32 tolerance, the eager chunked loss
    assert "gpt2lab compiled" in out and "transformers compiled" in out and "gpt2lab eager" in out
    assert "ratio gpt2lab / transformers (compiled, tokens/s):" in out
    assert "|loss diff| 0.0000" in out
    assert "repeat: identical" in out  # train.deterministic repeats bit for bit
    # train: torchrun with evaluation, a stop, a checkpoint, a resume, and no recompilation
    assert "--stop-at 8: stopped after step 8" in out and "finished at step 16" in out  # the rehearsal's 16 steps
    assert "recompilations: 0" in out
    assert "speed: ok" in out and "train: ok" in out
    assert (tmp_path / "speed.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_00000016").is_dir()


def test_a_part_that_fails_fails_the_script(tmp_path):
    result = run_gpu_sh("--out", str(tmp_path), "train", TRAIN_TIMEOUT="1", timeout=120)
    assert result.returncode == 1
    assert "train: FAILED: no result within 1 s" in result.stdout


def test_bad_arguments_get_one_line_and_exit_2():
    result = run_gpu_sh("fast", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu.sh: unknown argument 'fast'; usage: bench/gpu.sh [--out DIR] [speed] [train]"


def test_without_a_gpu_and_without_rehearse_nothing_runs(tmp_path):
    result = run_gpu_sh("--out", str(tmp_path), REHEARSE="0", CUDA_VISIBLE_DEVICES="", timeout=120)
    assert result.returncode == 1
    assert "torch sees no CUDA GPU here; REHEARSE=1 runs the script on the CPU" in result.stderr


@pytest.fixture
def pydeps():
    spec = importlib.util.spec_from_file_location("pydeps", REPO / "bench" / "pydeps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(directory: Path, name: str, version: str, tag: str, requires_python: str = "") -> Path:
    path = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        if requires_python:
            meta += f"Requires-Python: {requires_python}\n"
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_pydeps_unpacks_a_missing_module_and_nothing_that_imports(pydeps, tmp_path, monkeypatch):
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    wheels.mkdir()
    target.mkdir()
    make_wheel(wheels, "fakedep", "1.0", "py3-none-any")
    make_wheel(wheels, "fakedep", "2.0", "py3-none-any", requires_python=">=3.99")  # too new a Python
    monkeypatch.setitem(pydeps.PROBES, "fake", "import json, fakedep; assert fakedep.VERSION == '1.0'")
    assert pydeps.ensure("fake", wheels, target, "") == ["fakedep-1.0-py3-none-any.whl"]
    assert (target / "fakedep" / "__init__.py").is_file()
    assert pydeps.ensure("fake", wheels, target, "") == []  # it imports now: nothing more


def test_pydeps_says_what_to_run_when_a_wheel_is_missing(pydeps, tmp_path, monkeypatch):
    monkeypatch.setitem(pydeps.PROBES, "fake", "import fakedep_nowhere")
    with pytest.raises(SystemExit) as e:
        pydeps.ensure("fake", tmp_path, tmp_path, "")
    assert "module 'fakedep_nowhere' is missing" in str(e.value) and "bench/fetch_wheels.sh" in str(e.value)


@pytest.mark.parametrize(
    "wheel, version, ok",
    [
        ("numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl", (3, 11), 3),
        ("numpy-2.4.6-cp312-cp312-manylinux_2_17_x86_64.whl", (3, 11), 0),  # another CPython's build
        ("tiktoken-0.14.0-cp39-abi3-manylinux_2_17_x86_64.whl", (3, 12), 2),  # the stable ABI serves 3.12
        ("tqdm-4.70.1-py3-none-any.whl", (3, 10), 1),
        ("numpy-2.4.6-cp311-cp311-macosx_14_0_arm64.whl", (3, 11), 0),
    ],
)
def test_pydeps_wheel_tags(pydeps, wheel, version, ok, monkeypatch):
    monkeypatch.setattr(pydeps, "glibc", lambda: (2, 35))
    monkeypatch.setattr(pydeps.os, "uname", lambda: os.uname_result(("Linux", "h", "6", "1", "x86_64")))
    monkeypatch.setattr(pydeps.sys, "platform", "linux")
    assert pydeps.compatible(wheel, version) == ok


@pytest.mark.parametrize(
    "spec, version, ok",
    [
        (">=3.10", (3, 11), True),
        (">=3.12", (3, 11), False),
        (">=3.9,<3.11", (3, 11), False),
        (">=3.10.1", (3, 10), True),
    ],
)
def test_pydeps_requires_python(pydeps, spec, version, ok):
    assert pydeps.python_ok(spec, version) is ok
