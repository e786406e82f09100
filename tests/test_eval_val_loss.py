import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import gpt2lab_twin, hf_gpt2

from gpt2lab import GPT2LabError, get_tokenizer
from gpt2lab.data import PrepareOptions, open_split_tokens, write_shard
from gpt2lab.data.prepare import prepare
from gpt2lab.download import cache_dir
from gpt2lab.eval import VAL_LOSS_REFERENCES, hellaswag
from gpt2lab.eval.common import EvalContext
from gpt2lab.eval.val_loss import DEFAULT_MAX_TOKENS, val_loss
from gpt2lab.train.evaluate import Evaluator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_path):
    """Tiny Shakespeare's start through `gpt2lab prepare`: a 1,000-token val split in 3 shards."""
    root = tmp_path_factory.mktemp("prepared")
    source = root / "shakespeare.txt"
    source.write_text(shakespeare_path.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    options = PrepareOptions(
        source=str(source), out=root / "data", shard_tokens=400, val_tokens=1000, workers=1, progress=False
    )
    prepare(options)
    return root / "data"


def direct_loss(hf, tokens: np.ndarray, seq_len: int, windows: int) -> float:
    """Window w = tokens [w T, (w + 1) T]: transformers' logits on its first T, loss on its last T."""
    total = 0.0
    for w in range(windows):
        buf = torch.from_numpy(tokens[w * seq_len : (w + 1) * seq_len + 1].astype(np.int64))
        with torch.no_grad():
            logits = hf(buf[None, :-1]).logits[0]
        total += F.cross_entropy(logits, buf[1:], reduction="sum").item()
    return total / (windows * seq_len)


def test_val_loss_equals_direct_computation_at_any_batch_size(models, data_dir):
    hf, ours = models
    tokens = open_split_tokens(data_dir, "val")[:]
    assert len(tokens) == 1000
    expected = direct_loss(hf, tokens, seq_len=16, windows=21)
    for batch_size in (1, 4, 64):
        result = val_loss(ours, data_dir, EvalContext(batch_size=batch_size), max_tokens=16 * 21 + 7, seq_len=16)
        assert (result.tokens, result.windows, result.seq_len) == (336, 21, 16)
        assert result.loss == pytest.approx(expected, rel=1e-6)
        assert result.perplexity == pytest.approx(np.exp(expected), rel=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_chunked_losses_equal_the_full_logits_and_no_full_logits_are_made(models, data_dir, monkeypatch, dtype):
    hf, _ = models
    ours = gpt2lab_twin(hf, pad_vocab_multiple=64)  # padding rows must stay out of the softmax
    assert ours.config.padded_vocab_size == 50304
    tokens = open_split_tokens(data_dir, "val")[:].astype(np.int64)
    expected = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for w in range(12):  # the model's own full (T, V) logits, window by window
            buf = torch.from_numpy(tokens[w * 16 : (w + 1) * 16 + 1])
            logits, _ = ours(buf[None, :-1])
            expected += F.cross_entropy(logits[0].float(), buf[1:], reduction="sum").item()
    expected /= 12 * 16

    from gpt2lab.eval import common

    monkeypatch.setattr(common, "nll_chunk_rows", lambda device: 7)
    rows = []
    hook = ours.lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
    try:
        ctx = EvalContext(batch_size=5, autocast_dtype=dtype)
        result = val_loss(ours, data_dir, ctx, max_tokens=12 * 16, seq_len=16)
    finally:
        hook.remove()
    assert result.loss == pytest.approx(expected, rel=1e-6 if dtype is None else 1e-4)
    assert max(rows) == 7 and sum(rows) == 12 * 16  # 7 positions' logits at a time, each position once


def test_budget_larger_than_the_split_uses_all_of_it(models, data_dir):
    _, ours = models
    result = val_loss(ours, data_dir, seq_len=64)  # default budget: 10,485,760 tokens
    assert DEFAULT_MAX_TOKENS == 10_485_760
    assert result.windows == (1000 - 1) // 64 and result.tokens == 15 * 64


class DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel: evaluations must use `.module`, never the wrapper."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise AssertionError("an evaluation called the DDP wrapper")


def test_training_loop_entry_point(models, data_dir, items_file):
    _, ours = models
    tok = get_tokenizer()
    items = hellaswag.read_items(items_file)
    # The training loop's Evaluator finds HellaSwag's validation file in the (empty, per-test) cache.
    cache_dir().mkdir(parents=True, exist_ok=True)
    shutil.copy(items_file, cache_dir() / hellaswag.CACHE_NAME)
    evaluator = Evaluator(str(data_dir), tok, val_tokens=320, tasks=["hellaswag"], extra=[], rank=0, world_size=1)
    wrapped = DDPLike(ours)
    wrapped.train()
    metrics = evaluator(wrapped, EvalContext(batch_size=4, step=7, tokenizer=tok, seq_len=32))
    assert ours.training  # train mode restored
    ours.eval()
    assert set(metrics) == {"val_loss", "val_tokens", "hellaswag_acc_norm", "hellaswag_acc", "hellaswag_items"}
    assert metrics["val_tokens"] == 320 and metrics["hellaswag_items"] == len(items)
    expected = val_loss(ours, data_dir, EvalContext(batch_size=2), max_tokens=320, seq_len=32).loss
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["hellaswag_acc_norm"] == hellaswag.evaluate(ours, tok, items).acc_norm
    assert VAL_LOSS_REFERENCES == {"gpt2-124M": 3.2924}


def test_bad_input(models, data_dir, tmp_path):
    _, ours = models
    with pytest.raises(GPT2LabError, match="smaller than one window of 16 tokens"):
        val_loss(ours, data_dir, max_tokens=10, seq_len=16)
    with pytest.raises(GPT2LabError, match="between 1 and the model's block size 64"):
        val_loss(ours, data_dir, seq_len=65)
    write_shard(tmp_path / "short" / "x_val_000000.bin", np.arange(40, dtype=np.uint16), "val")
    with pytest.raises(GPT2LabError, match="has 40 tokens, fewer than one window of 64"):
        val_loss(ours, tmp_path / "short")
    small = gpt2lab_twin(hf_gpt2(seed=1, vocab_size=1000))
    with pytest.raises(GPT2LabError, match="token id .* outside the model's vocabulary of 1000"):
        val_loss(small, data_dir, max_tokens=64, seq_len=16)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_hash"] = "0" * 64
    other = tmp_path / "other"
    other.mkdir()
    for f in data_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GPT2LabError, match="prepare the data again with this tokenizer"):
        val_loss(ours, other, seq_len=16, tokenizer=get_tokenizer())


def test_cli_val_loss(cli, models, data_dir, tmp_path):
    hf, ours = models
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "val.json"
    args = ["--data", data_dir, "--seq-len", "16", "--max-tokens", "320", "--batch-size", "3", "--json", out]
    result = cli("eval", "--model", tmp_path / "hf", "--task", "val-loss", "--device", "cpu", *args)
    assert result.code == 0, result.err
    assert "val loss" in result.out and "320 (20 windows of 16, of 1,000)" in result.out
    report = json.loads(out.read_text())
    expected = val_loss(ours, data_dir, max_tokens=320, seq_len=16).loss
    assert report["results"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert report["data"]["split_tokens"] == 1000
    # FineWeb-Edu's reference only beside FineWeb-Edu: here it would invite a wrong comparison.
    assert report["references"] == {} and "FineWeb-Edu" not in result.out
    edu = tmp_path / "edu_fineweb10B"  # the same val tokens under llm.c's FineWeb-Edu shard names
    edu.mkdir()
    for i, shard in enumerate(sorted(Path(data_dir).glob("*_val_*.bin"))):
        shutil.copy(shard, edu / f"edu_fineweb_val_{i:06d}.bin")
    result = cli("eval", "--model", tmp_path / "hf", "--task", "val-loss", "--device", "cpu", *args[:-2], "--data", edu)
    assert result.code == 0, result.err
    assert "gpt2-124M 3.2924 (FineWeb-Edu val)" in result.out

    missing = cli("eval", "--model", tmp_path / "hf", "--task", "val-loss", "--data", tmp_path / "nowhere")
    assert missing.code == 1 and len(missing.err.strip().splitlines()) == 1 and "nowhere" in missing.err
