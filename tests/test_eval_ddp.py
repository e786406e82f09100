"""Every evaluation sharded over two gloo processes under torchrun gives the single-process numbers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from eval_data import ITEMS, write_items
from helpers import gpt2lab_twin, hf_gpt2, subprocess_env

from gpt2lab import get_tokenizer
from gpt2lab.data import write_shard
from gpt2lab.eval import EvalContext, hellaswag, perplexity, val_loss

WORKER = Path(__file__).with_name("eval_ddp_worker.py")

pytestmark = [pytest.mark.subprocess, pytest.mark.usefixtures("one_thread")]


def test_two_gloo_ranks_equal_one_process(tmp_path, shakespeare_path):
    hf = hf_gpt2(seed=9, initializer_range=0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = gpt2lab_twin(hf)
    tok = get_tokenizer()
    items = write_items(tmp_path / "items.jsonl", [*ITEMS, ITEMS[2]])  # 7 items: 4 on rank 0, 3 on rank 1
    text = shakespeare_path.read_text(encoding="utf-8")[:3000]
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    # Two val shards, so that windows span a shard boundary; named as llm.c names them (no manifest).
    write_shard(tmp_path / "val" / "tiny_val_000000.bin", tokens[:200], "val")
    write_shard(tmp_path / "val" / "tiny_val_000001.bin", tokens[200:500], "val")
    spec = {
        "model": str(tmp_path / "hf"),
        "items": str(items),
        "text": text[:600],
        "val_dir": str(tmp_path / "val"),
        "val_tokens": 16 * 21,
        "out": str(tmp_path / "out"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run([*cmd, str(tmp_path / "spec.json")], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("| 2 process(es) |") == 1  # only rank 0 prints the table

    ranks = [json.loads((tmp_path / "out" / f"library_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # all-reduced, then summed in the same order on every rank

    single_ppl = perplexity.evaluate(ours, tok.encode(spec["text"]), EvalContext(batch_size=3), context=16, stride=5)
    ddp_ppl = ranks[0]["perplexity"]
    assert (ddp_ppl["scored_tokens"], ddp_ppl["windows"]) == (single_ppl.scored_tokens, single_ppl.windows)
    assert ddp_ppl["nll"] == pytest.approx(single_ppl.nll, rel=1e-6)

    single_val = val_loss.val_loss(ours, tmp_path / "val", EvalContext(batch_size=2), max_tokens=16 * 21, seq_len=16)
    assert ranks[0]["val_loss"]["tokens"] == single_val.tokens == 336
    assert ranks[0]["val_loss"]["loss"] == pytest.approx(single_val.loss, rel=1e-6)

    single_hs = hellaswag.evaluate(ours, tok, hellaswag.read_items(items), EvalContext(batch_size=2))
    report = json.loads((tmp_path / "out" / "hellaswag.json").read_text())
    assert report["run"]["world_size"] == 2
    assert report["results"]["items"] == single_hs.items == 7
    assert (report["results"]["correct"], report["results"]["correct_norm"]) == (
        single_hs.correct,
        single_hs.correct_norm,
    )
