"""Without network a Hub dataset, or a download, fails at once in one line that says what works offline,
instead of huggingface_hub's half a minute of `Retrying in 8s` (issue 23). "No network" is a Hub
endpoint on a local port nobody listens on, so the tests behave the same on a machine with internet."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from helpers import subprocess_env

from gpt2lab import download
from gpt2lab.errors import GPT2LabError


@pytest.fixture
def closed_port() -> int:
    """A local TCP port with nothing listening on it: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(monkeypatch, closed_port):
    """Offline mode off, the Hub at `closed_port`, and no proxy in the way."""
    for name in download.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    return f"http://127.0.0.1:{closed_port}"


def test_hub_unreachable_says_why(monkeypatch, no_hub):
    assert download.hub_unreachable().startswith("cannot connect to 127.0.0.1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert download.hub_unreachable() == "HF_DATASETS_OFFLINE is set"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert download.unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None
    assert download.unreachable("file:///nowhere") is None  # not a server


def test_a_cached_dataset_loads_in_offline_mode(monkeypatch, no_hub):
    """Where the Hub cannot be reached, load_dataset runs in offline mode (its cache only, no retries),
    and the switches are put back after."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    seen = []

    def cached(name, config=None, split=None):
        seen.append((huggingface_hub.constants.is_offline_mode(), datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"text": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", cached)
    before = (huggingface_hub.constants.is_offline_mode(), datasets.config.HF_HUB_OFFLINE)
    ds = download.load_hf_dataset("someone/corpus", None, "test", streaming=False, where="w", check="c", instead="i")
    assert ds["text"] == ["a", "b"] and seen == [(True, True)]
    assert (huggingface_hub.constants.is_offline_mode(), datasets.config.HF_HUB_OFFLINE) == before
    with pytest.raises(GPT2LabError, match=r"^cannot open the w: the Hugging Face Hub is unreachable \(cannot "):
        download.load_hf_dataset("someone/corpus", None, "test", streaming=True, where="w", check="c", instead="i")
    assert len(seen) == 1  # a stream reads the Hub as it goes: not even tried


def test_a_download_fails_at_once(no_hub, tmp_path):
    with pytest.raises(GPT2LabError, match=r"could not download .* \(cannot connect to 127\.0\.0\.1"):
        download.cached_download(f"{no_hub}/hellaswag_val.jsonl", "hellaswag_val.jsonl")


def offline_cli(*args: str, endpoint: str) -> subprocess.CompletedProcess:
    """`python -m gpt2lab ARGS` where the Hub is `endpoint`, offline mode off and no proxy."""
    env = {
        k: v
        for k, v in subprocess_env().items()
        if k not in download.OFFLINE_VARIABLES and not k.lower().endswith("_proxy")
    }
    return subprocess.run(
        [sys.executable, "-m", "gpt2lab", *args],
        env={**env, "HF_ENDPOINT": endpoint},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.subprocess
def test_prepare_and_eval_from_the_hub_fail_in_one_line_without_retries(tmp_path, hf_dir, no_hub):
    pytest.importorskip("datasets")
    prepare = offline_cli("prepare", "fineweb-edu-10B", "--out", str(tmp_path / "data"), endpoint=no_hub)
    evaluate = offline_cli(
        "eval", "--model", str(hf_dir), "--task", "perplexity", "--data", "wikitext-2", endpoint=no_hub
    )
    for proc, advice in ((prepare, "gpt2lab prepare PATH --out DIR"), (evaluate, "--data path/to/file.txt")):
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Retrying" not in proc.stderr, proc.stderr
        assert "the Hugging Face Hub is unreachable (cannot connect to 127.0.0.1" in lines[0]
        assert lines[0].endswith(advice), lines[0]
    assert not (tmp_path / "data").exists()
