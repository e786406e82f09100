"""Shared test fixtures. Every test runs offline on CPU with its own empty caches."""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tiny Shakespeare ships with the package (the tinyshakespeare preset reads it): the tests need nothing
# beside the checkout.
SHAKESPEARE_GZ = REPO / "src" / "gpt2lab" / "data" / "tinyshakespeare.txt.gz"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@functools.cache
def shakespeare_text() -> str:
    """The whole of Tiny Shakespeare (1,115,394 characters), checked against its published sha256."""
    data = gzip.decompress(SHAKESPEARE_GZ.read_bytes())
    assert hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256, f"{SHAKESPEARE_GZ} is damaged"
    return data.decode("utf-8")


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
def shakespeare_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare as a plain file named as the preset names it (shards: tinyshakespeare_*.bin)."""
    path = tmp_path_factory.mktemp("shakespeare") / "tinyshakespeare.txt"
    path.write_bytes(shakespeare_text().encode("utf-8"))
    path.chmod(0o444)  # shared by the whole session: no test may change it
    return path


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
