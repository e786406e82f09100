"""Light imports: the package, the CLI's help, data preparation and its workers, and the tokenizer
trainer run without loading torch (a fresh interpreter each, so nothing imported by another test
counts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import subprocess_env

pytestmark = pytest.mark.subprocess

# Modules whose import costs seconds or hundreds of MB, none of which these paths need.
HEAVY = ("torch", "transformers", "datasets", "matplotlib", "safetensors.torch")


def heavy_modules_after(code: str, cwd: Path | None = None) -> list[str]:
    """Run `code` in a fresh interpreter; the HEAVY modules it left in sys.modules."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json as _json, sys as _sys
        print("HEAVY=" + _json.dumps([m for m in {HEAVY!r} if m in _sys.modules]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return json.loads(line.removeprefix("HEAVY="))


def help_code(*args: str) -> str:
    return f"""
        import contextlib, io
        from gpt2lab.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main({list(args)!r})
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "usage: gpt2lab" in out.getvalue(), out.getvalue()
    """


@pytest.mark.parametrize(
    "code",
    [
        "import gpt2lab",
        "import gpt2lab.cli",
        "import gpt2lab.data",
        "from gpt2lab.data import read_manifest, PrepareOptions",
        help_code("--help"),
        help_code("prepare", "--help"),
        help_code("tokenizer", "--help"),
        help_code("tokenizer", "train", "--help"),
        "from gpt2lab.train import TrainConfig, load_train_config, to_toml",
        help_code("train", "--help"),
    ],
    ids=[
        "gpt2lab",
        "cli",
        "data",
        "data-names",
        "help",
        "prepare-help",
        "tokenizer-help",
        "tokenizer-train-help",
        "train-config",
        "train-help",
    ],
)
def test_no_torch(code):
    assert heavy_modules_after(code) == []


def test_lazy_exports_resolve_to_their_modules():
    import gpt2lab
    import gpt2lab.data
    from gpt2lab import model
    from gpt2lab.data import shards

    assert gpt2lab.GPT is model.GPT
    assert gpt2lab.data.read_manifest is shards.read_manifest
    assert set(gpt2lab.__all__) <= set(dir(gpt2lab))
    with pytest.raises(AttributeError, match="module 'gpt2lab' has no attribute 'nonexistent'"):
        gpt2lab.nonexistent  # noqa: B018


def test_generate_stays_the_function_when_its_module_is_imported_first():
    # The submodule gpt2lab/generate.py is imported before the name `gpt2lab.generate` is looked up,
    # which sets the module as the package's attribute; the package keeps the function.
    code = """
        import gpt2lab
        from gpt2lab.generate import SamplingParams, generate
        assert gpt2lab.generate is generate, gpt2lab.generate
        assert gpt2lab.SamplingParams is SamplingParams
        from gpt2lab import generate as g
        assert g is generate
    """
    assert "torch" in heavy_modules_after(code)  # the script's own asserts passed; generation needs torch


def test_prepare_and_its_spawned_workers_load_no_torch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    # Spawned workers (the default on macOS, and on Linux from Python 3.14) import what they run from
    # scratch: the worker's own imports are what is measured. The probe runs in the same worker after
    # it has tokenized a task.
    code = f"""
        import multiprocessing as mp
        mp.set_start_method("spawn", force=True)
        from gpt2lab.cli import main
        assert main(["prepare", {str(corpus)!r}, "--out", {str(tmp_path / "out")!r}, "--workers", "2",
                     "--no-progress"]) == 0
        from gpt2lab.data import encode
        from gpt2lab.tokenizer import get_tokenizer
        tok = get_tokenizer()
        init = (tok.encoding, tok.eot_token)
        with mp.get_context("spawn").Pool(1, initializer=encode._init_worker, initargs=init) as pool:
            tokens = pool.apply(encode._encode_task, ([("Hello world", True)],))
            assert tokens.tolist() == [tok.eot_token, *tok.encode("Hello world")], tokens
            worker_heavy = pool.apply(eval, ("[m for m in {HEAVY!r} if m in __import__('sys').modules]",))
        assert worker_heavy == [], worker_heavy
    """
    assert heavy_modules_after(code) == []
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_tokenizer_training_loads_no_torch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("low lower lowest newer newest wider widest\n" * 300, encoding="utf-8")
    code = f"""
        from gpt2lab.cli import main
        assert main(["tokenizer", "train", {str(corpus)!r}, "--vocab-size", "270", "--out",
                     {str(tmp_path / "tok")!r}]) == 0
        assert main(["tokenizer", "stats", {str(corpus)!r}, "--tokenizer", {str(tmp_path / "tok")!r}]) == 0
    """
    assert heavy_modules_after(code) == []
    assert json.loads((tmp_path / "tok" / "gpt2lab_tokenizer.json").read_text())["n_vocab"] == 270
