import pytest
import torch
from helpers import run_cli_subprocess

from gpt2lab import load_model
from gpt2lab.cli import COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(cli, command):
    result = cli(command, "--help")
    assert result.code == 0
    assert f"usage: gpt2lab {command}" in result.out


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("gpt2lab ")


def test_convert_both_ways_then_sample(cli, hf_dir, tmp_path):
    result = cli("convert", "--from-hf", hf_dir, "--out", tmp_path / "ckpt")
    assert result.code == 0, result.err
    assert "wrote gpt2lab checkpoint" in result.out
    result = cli("convert", "--to-hf", tmp_path / "ckpt", "--out", tmp_path / "back")
    assert result.code == 0, result.err
    a, b = load_model(hf_dir), load_model(tmp_path / "back")
    idx = torch.randint(0, 50257, (1, 10))
    assert torch.equal(a(idx)[0], b(idx)[0])

    result = cli(
        "sample",
        "--model",
        tmp_path / "ckpt",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--seed",
        "1",
        "--device",
        "cpu",
    )
    assert result.code == 0, result.err
    assert result.out.startswith("Hello")
    assert "tokens/s" in result.err and "seed 1" in result.err
    again = cli(
        "sample",
        "--model",
        tmp_path / "ckpt",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--seed",
        "1",
        "--no-stream",
        "--device",
        "cpu",
    )
    assert again.out == result.out  # streaming and batch decoding print the same text

    many = cli(
        "sample",
        "--model",
        hf_dir,
        "--prompt",
        "Hi",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--device",
        "cpu",
    )
    assert many.code == 0, many.err
    assert many.out.count("---------- sample") == 3


def test_convert_refuses_to_overwrite(cli, hf_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    result = cli("convert", "--from-hf", hf_dir, "--out", tmp_path / "taken")
    assert result.code == 1
    assert "already exists and is not empty" in result.err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--model", "gpt7"], "unknown model 'gpt7'"),
        (["sample", "--model", "gpt2"], "could not download model 'gpt2'"),
        (["sample", "--model", "MODEL", "--top-p", "1.5"], "--top-p must be between 0 and 1 (0 or 1 = off)"),
        (["sample", "--model", "MODEL", "--temperature", "-1"], "--temperature must be >= 0"),
        pytest.param(
            ["sample", "--model", "MODEL", "--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["sample", "--model", "MODEL", "--device", "tpu"], "unknown device 'tpu'"),
        (["convert", "--to-hf", "/nonexistent/ckpt", "--out", "OUT"], "/nonexistent/ckpt"),
        (["eval", "--task", "val-loss", "--model", "MODEL", "--data", "FILE"], "run: gpt2lab eval --task perplexity"),
    ],
)
def test_bad_input_is_one_line_without_traceback(cli, hf_dir, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("a text file, not a prepared directory\n")
    names = {"MODEL": str(hf_dir), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "notes.txt")}
    args = [names.get(a, a) for a in args]
    result = cli(*args)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert message in lines[0]
    assert "Traceback" not in result.err


@pytest.mark.subprocess
def test_subprocess_exit_code_and_message(tmp_path):
    proc = run_cli_subprocess("sample", "--model", tmp_path / "missing-dir")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gpt2lab sample: error:")
    assert "Traceback" not in proc.stderr


def test_top_p_and_top_k_are_off_at_0_alike(cli, hf_dir):
    def sample(*extra):
        args = ["sample", "--model", hf_dir, "--prompt", "Hi", "--max-new-tokens", "8", "--seed", "3", *extra]
        result = cli(*args, "--device", "cpu")
        assert result.code == 0, result.err
        return result.out

    assert sample("--top-p", "0") == sample("--top-p", "1")
    assert sample("--top-k", "0", "--top-p", "0") == sample("--top-k", "0")


def test_one_top_k_default_for_the_cli_and_the_playground():
    import re
    from pathlib import Path

    import gpt2lab.serve
    from gpt2lab.cli import build_parser

    cli_default = build_parser().parse_args(["sample", "--model", "m"]).top_k
    page = (Path(gpt2lab.serve.__file__).parent / "static" / "index.html").read_text()
    playground = int(re.search(r'id="top_k"[^>]*value="(\d+)"', page).group(1))
    assert playground == cli_default == 200
