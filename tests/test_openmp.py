"""`gpt2lab train`, `eval`, `sample`, `chat` and `serve` make idle OpenMP threads spin briefly
(GOMP_SPINCOUNT=10000) before torch loads, unless the user chose a waiting policy (issue 23; docs/cpu.md,
"Threads on a busy machine")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import subprocess_env

import gpt2lab.cli as gpt2lab_cli
from gpt2lab.openmp import SPINCOUNT, spin_briefly


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, {"GOMP_SPINCOUNT": SPINCOUNT}),
        ({"OMP_WAIT_POLICY": ""}, {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": SPINCOUNT}),  # empty = unset
        ({"GOMP_SPINCOUNT": "300000"}, {"GOMP_SPINCOUNT": "300000"}),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ],
)
def test_the_users_setting_wins(environ, expected):
    changed = expected != environ
    environ = dict(environ)
    assert spin_briefly(environ) == changed
    assert environ == expected


def test_train_and_eval_ask_for_it_and_the_other_commands_do_not(cli, monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(gpt2lab_cli, "spin_briefly_before_torch", lambda: asked.append(True))
    assert cli("train", tmp_path / "missing.toml").code == 1 and asked == [True]
    assert cli("eval", "--model", tmp_path / "missing", "--task", "val-loss").code != 0 and len(asked) == 2
    assert cli("prepare", tmp_path / "missing.txt", "--out", tmp_path / "out").code == 1 and len(asked) == 2


# Runs `python -m gpt2lab ARGS` as torchrun's workers do, then notes the GOMP_SPINCOUNT that the process
# had when torch was first imported, in the command or after it: what libgomp reads.
SPY = """
import importlib.abc, os, runpy, sys

seen = []

class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))

sys.meta_path.insert(0, Spy())
sys.argv = ["gpt2lab", *{args!r}]
try:
    runpy.run_module("gpt2lab", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
import torch
print("AT_TORCH_LOAD=" + repr(seen[0]))
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("user, expected", [({}, SPINCOUNT), ({"OMP_WAIT_POLICY": "PASSIVE"}, None)])
def test_python_m_gpt2lab_train_sets_it_before_torch_loads(tmp_path, user, expected):
    env = {k: v for k, v in subprocess_env().items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = textwrap.dedent(SPY.format(args=["train", str(tmp_path / "missing.toml")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**env, **user}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "config file" in proc.stderr  # the command ran, and failed as it should
    assert proc.stdout.strip().splitlines()[-1] == f"AT_TORCH_LOAD={expected!r}"
