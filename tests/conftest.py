"""Shared test fixtures. Every test runs offline on CPU with its own empty caches."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def offline_env(tmp_path_factory, monkeypatch):
    """No network and fresh caches: the Hub is offline, downloads go to an empty temp cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache / "gpt2lab"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    assert SHAKESPEARE.is_file(), f"{SHAKESPEARE} is missing: the tests expect ../shared/data beside the repo"
    return SHAKESPEARE


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `gpt2lab ARGS...` in this process; returns exit code, stdout and stderr."""
    from gpt2lab.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def subprocess_env() -> dict[str, str]:
    """Environment for running gpt2lab in a child process from this checkout's sources."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli_subprocess(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m gpt2lab ARGS...` in a child process (for signals, torchrun, real exit codes)."""
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *map(str, args)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
