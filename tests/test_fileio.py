"""What gpt2lab writes gets the permissions mkdir and cp give, the user's umask, although every file and
folder is first made under a temporary name (issue 23: tempfile.mkdtemp made folders drwx------)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from train_utils import tiny_config

from gpt2lab.fileio import atomic_dir, atomic_write_json, atomic_write_text, temp_dir_beside

UMASKS = [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)]  # (umask, folders, files)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, set[int]]:
    """{"dir": modes, "file": modes} of `root` and everything under it."""
    found: dict[str, set[int]] = {"dir": set(), "file": set()}
    for path in [root, *root.rglob("*")]:
        found["dir" if path.is_dir() else "file"].add(stat.S_IMODE(path.stat().st_mode))
    return found


@pytest.mark.parametrize("mask, folders, files", UMASKS, ids=["umask-022", "umask-077"])
def test_atomic_folders_and_files_get_the_umask(tmp_path, mask, folders, files):
    with umask(mask):
        for overwrite in (False, True):  # a new folder, then one replacing it
            with atomic_dir(tmp_path / "out", overwrite=overwrite) as tmp:
                atomic_write_text(tmp / "a.txt", "a")
                atomic_write_json(tmp / "sub" / "b.json", {})
            assert modes(tmp_path / "out") == {"dir": {folders}, "file": {files}}
        spare = temp_dir_beside(tmp_path / "step_000001")
    assert spare.parent == tmp_path and spare.name.startswith(".step_000001.tmp-")
    assert modes(spare) == {"dir": {folders}, "file": set()}
    assert temp_dir_beside(tmp_path / "step_000001") != spare  # never the same folder twice


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mask, folders, files", UMASKS, ids=["umask-022", "umask-077"])
def test_a_run_its_export_and_a_tokenizer_get_the_umask(corpus, shakespeare_path, tmp_path, cli, mask, folders, files):
    """The training run with its checkpoint folders, a Hugging Face export and a trained tokenizer: a
    colleague (umask 022) can read them all, a private user's (077) stay private."""
    from gpt2lab.train.loop import train

    run = tmp_path / "runs" / "tiny"
    with umask(mask):
        train(tiny_config(corpus, run, train={"max_steps": 1}, checkpoint={"every": 1}), progress=False)
        exported = cli("convert", "--to-hf", run, "--out", tmp_path / "export" / "tiny")
        trained = cli("tokenizer", "train", shakespeare_path, "--vocab-size", "300", "--out", tmp_path / "tok" / "t")
    assert exported.code == 0, exported.err
    assert trained.code == 0, trained.err
    assert any(p.is_dir() for p in (run / "checkpoints").iterdir())
    for root in (run, tmp_path / "export" / "tiny", tmp_path / "tok" / "t"):
        assert modes(root) == {"dir": {folders}, "file": {files}}, root
