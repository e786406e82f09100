"""Shared test fixtures, defined here once and requested by name (nothing is imported from this file;
plain helpers are in helpers.py, train_utils.py and eval_data.py). Every test runs offline on CPU with
its own empty caches.

    offline_env       (autouse) no network, fresh Hugging Face and gpt2lab caches
    one_thread        torch on one thread, for files of tiny-model tests (pytest.mark.usefixtures)
    cli               `gpt2lab ARGS...` in this process: exit code, stdout, stderr
    shakespeare_path  Tiny Shakespeare as a read-only file
    tok               GPT-2's tokenizer
    models            (transformers GPT2LMHeadModel, its gpt2lab twin): tiny, weights spread wide
    hf_dir            `models`' transformers model saved as a Hugging Face directory
    items_file        HellaSwag items in the official schema (eval_data.ITEMS)
    positions_dir     llm.c-style shards whose every token is its position in the split
    corpus            60K characters of Tiny Shakespeare prepared into shards (train_utils.tiny_config)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_data import write_items
from helpers import gpt2lab_twin, hf_gpt2, shakespeare_text

# positions_dir's uneven train shards (a 3-token one among them), and its val split's length.
POSITION_SHARDS = (1000, 1537, 3, 700)
POSITION_VAL_TOKENS = 300


@pytest.fixture(autouse=True)
def offline_env(tmp_path_factory, monkeypatch):
    """No network and fresh caches: the Hub is offline, downloads go to an empty temp cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("GPT2LAB_CACHE", str(cache / "gpt2lab"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spinning threads
    make every op wait for a core (see docs/performance.md): the training and evaluation tests use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare as a plain file named as the preset names it (shards: tinyshakespeare_*.bin)."""
    path = tmp_path_factory.mktemp("shakespeare") / "tinyshakespeare.txt"
    path.write_bytes(shakespeare_text().encode("utf-8"))
    path.chmod(0o444)  # shared by the whole session: no test may change it
    return path


@pytest.fixture(scope="session")
def tok():
    from gpt2lab.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="module")
def models():
    """(transformers GPT2LMHeadModel, the gpt2lab GPT with its weights), 2 layers, 32 wide, 64 positions.

    The weights spread wider than GPT-2's 0.02 init, so that the candidates of a HellaSwag item, and
    the tokens of a text, get clearly different losses. One pair per test module: no module sees
    another's changes."""
    hf = hf_gpt2(seed=5, initializer_range=0.2)
    return hf, gpt2lab_twin(hf)


@pytest.fixture
def hf_dir(tmp_path, models) -> Path:
    """`models`' transformers model as a Hugging Face directory (config.json + model.safetensors)."""
    models[0].save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def items_file(tmp_path) -> Path:
    """eval_data.ITEMS as a HellaSwag JSONL file, named as the official validation file is."""
    return write_items(tmp_path / "hellaswag_val.jsonl")


@pytest.fixture
def positions_dir(tmp_path) -> Path:
    """An llm.c-style directory (no manifest): train tokens 0..3239 in the 4 POSITION_SHARDS, val
    tokens 0..299; each token's value is its position in the split, so batches show where they came from."""
    from gpt2lab.data import shards

    start = 0
    for i, n in enumerate(POSITION_SHARDS):
        shards.write_shard(tmp_path / f"pos_train_{i + 1:06d}.bin", np.arange(start, start + n))
        start += n
    shards.write_shard(tmp_path / "pos_val_000000.bin", np.arange(POSITION_VAL_TOKENS))
    return tmp_path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 60,000 characters of Tiny Shakespeare through `gpt2lab prepare`: 2,048 val tokens,
    the rest train, GPT-2's tokenizer. Shared by the session: tests only read it."""
    from gpt2lab.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("corpus")
    text = root / "shakespeare.txt"
    text.write_text(shakespeare_text()[:60_000], encoding="utf-8")
    prepare(PrepareOptions(source=str(text), out=root / "data", val_tokens=2048, workers=1, progress=False))
    return root / "data"
