"""bench/sft_skill.py end to end (a few CPU minutes, slow-marked): a tiny model pretrained on text learns a
skill from chat fine-tuning, held-out questions scored by exact match, three ways of fine-tuning
compared; docs/training.md records the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sft_skill.py"


@pytest.mark.slow
def test_chat_fine_tuning_teaches_a_skill_the_base_model_lacks(tmp_path):
    out = tmp_path / "sft.json"
    cmd = [sys.executable, str(BENCH), "--json", str(out)]  # the settings of docs/training.md's numbers
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert list(numbers)[2:] == ["base", "assistant", "rows-every-token", "all"]
    base = numbers["base"]
    assert base["exact"] == 0.0 and base["reply_loss"] > 5.0  # it has never seen the task or the chat tokens
    for name in ("assistant", "rows-every-token", "all"):
        run = numbers[name]
        assert run["reply_loss"] < base["reply_loss"] / 4, name  # every way of fine-tuning learns the replies
        assert run["user_voice"] == 0.0, name  # the replies never speak as the user
    assert numbers["all"]["exact"] > 0.5  # the best of the three, on this task (docs/training.md says why)
    assert "exact match" in result.stdout
